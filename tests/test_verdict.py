"""The verdict record, the gate that reads it, and runs that died (tasks/verdict.py).

Fast tests use a real SQLite MLflow store and real runs and model versions written with
``MlflowClient`` (no flow): publishing, forged and mixed records, "started last wins" among
FINISHED runs only, owner liveness of real (killed, zombie, reused-pid) processes, and marking
dead runs FAILED. The slow test kills real ``mirrorinf run`` processes with SIGKILL at every
stage of a run and checks what the gate and the next run make of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorinf.cli import main
from mirrorinf.tasks.tracking import GATE_TAG, REPORT_TAG, RUN_TAG, SUPERSEDED_TAG, get_client
from mirrorinf.tasks.verdict import (
    OWNER_HOST,
    OWNER_PID,
    OWNER_START,
    REAPED_TAG,
    STATUS_TAG,
    VERDICT_TAG,
    _process_start,
    gate_status,
    owner_alive,
    owner_tags,
    reap_dead_runs,
    tag_model_version,
    verdict_record,
)

ALIAS = "influence-passed"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One SQLite store for the file (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("verdict-store")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    return {"uri": uri, "client": get_client(uri), "root": root}


@pytest.fixture
def store(shared_store: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    """An experiment and a registered model version of its own for each test."""
    client, name = shared_store["client"], request.node.name
    exp = client.create_experiment(name, artifact_location=str(shared_store["root"] / name))
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=str(shared_store["root"] / name / "model"))
    return {**shared_store, "exp": exp, "version": str(mv.version), "model": name}


def influence(
    store: dict[str, Any],
    gate: str | None,
    *,
    start: int,
    status: str = "FINISHED",
    owner: dict[str, str] | None = None,
) -> str:
    """An influence-like run of the store's version with its own verdict ``gate``."""
    client = store["client"]
    tags = {
        "mirrorinf.kind": "influence",
        "mirrorinf.model.name": store["model"],
        "mirrorinf.model.version": store["version"],
        "mirrorinf.config_fingerprint": "cfg1",
        "mirrorinf.data.train.md5": "md5train",
        "mirrorinf.version": "0.1.0",
        **(owner if owner is not None else owner_tags()),
    }
    if gate:
        tags[GATE_TAG] = gate
    run_id = client.create_run(store["exp"], start_time=start, tags=tags).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


def publish(store: dict[str, Any], run_id: str, verdict: str) -> bool:
    return tag_model_version(
        store["uri"], store["model"], store["version"], verdict=verdict, run_id=run_id,
        alias_on_pass=ALIAS,
    )  # fmt: skip


def version_tags(store: dict[str, Any]) -> dict[str, str]:
    return store["client"].get_model_version(store["model"], store["version"]).tags


def set_record(store: dict[str, Any], **fields: Any) -> None:
    """Overwrite the version's record with changed fields (a forger or an older writer)."""
    record = json.loads(version_tags(store)[VERDICT_TAG])
    record.update(fields)
    client = store["client"]
    client.set_model_version_tag(store["model"], store["version"], VERDICT_TAG, json.dumps(record))


def forge(store: dict[str, Any], run_id: str) -> None:
    """Set the version's record to exactly what publishing ``run_id`` would write, whatever its
    status (what a writer that did not wait for FINISHED left behind)."""
    record = verdict_record(store["client"].get_run(run_id))
    store["client"].set_model_version_tag(
        store["model"], store["version"], VERDICT_TAG, json.dumps(record)
    )


@pytest.fixture
def dead_owner() -> dict[str, str]:
    """Owner tags of a real process of this host that was killed (and reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tags = {OWNER_HOST: socket.gethostname(), OWNER_PID: str(proc.pid),
            OWNER_START: _process_start(proc.pid) or ""}  # fmt: skip
    proc.kill()
    proc.wait()
    return tags


# --------------------------------------------------------------------------- owners


def test_owner_liveness_of_real_processes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tags = {OWNER_HOST: socket.gethostname(), OWNER_PID: str(proc.pid),
                OWNER_START: _process_start(proc.pid) or ""}  # fmt: skip
        assert owner_alive(tags) is True
        assert owner_alive({**tags, OWNER_START: "1"}) is False, "a reused pid is not the owner"
        assert owner_alive({**tags, OWNER_HOST: "elsewhere"}) is None, "another host: unknown"
        assert owner_alive({}) is None
        proc.send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while _process_start(proc.pid) is not None and time.time() < deadline:
            time.sleep(0.01)
        assert owner_alive(tags) is False, "killed, a zombie until its parent waits: dead"
    finally:
        proc.kill()
        proc.wait()
    assert owner_alive(tags) is False
    assert owner_alive(owner_tags()) is True


def test_reap_marks_only_dead_runs_of_this_host(store: dict[str, Any], dead_owner) -> None:
    dead = influence(store, "passed", start=1000, status="RUNNING", owner=dead_owner)
    live = influence(store, None, start=2000, status="RUNNING")
    other = {**dead_owner, OWNER_HOST: "another-host"}
    remote = influence(store, None, start=3000, status="RUNNING", owner=other)
    done = influence(store, "failed", start=4000, owner=dead_owner)
    assert reap_dead_runs(store["client"], store["exp"], by="test") == [dead]
    runs = {r: store["client"].get_run(r) for r in (dead, live, remote, done)}
    assert runs[dead].info.status == "FAILED"
    assert "gone" in runs[dead].data.tags["mirrorinf.error"]
    assert runs[dead].data.tags[REAPED_TAG] == "test"
    assert [runs[r].info.status for r in (live, remote, done)] == ["RUNNING", "RUNNING", "FINISHED"]
    assert reap_dead_runs(store["client"], store["exp"]) == []


# --------------------------------------------------------------------------- the record


def test_publish_writes_one_record_and_derived_tags(store: dict[str, Any]) -> None:
    name = store["model"]
    assert gate_status(store["uri"], name, store["version"]).verdict is None
    run_id = influence(store, "passed", start=1000)
    assert publish(store, run_id, "passed")
    tags = version_tags(store)
    record = json.loads(tags[VERDICT_TAG])
    assert record["gate"] == "passed" and record["run_id"] == run_id
    assert record["run_start"] == 1000 and record["train_md5"] == "md5train"
    assert record["config_fingerprint"] == "cfg1" and record["report"].endswith("/report.md")
    assert (tags[GATE_TAG], tags[RUN_TAG], tags[STATUS_TAG]) == ("passed", run_id, "passed")
    assert tags[REPORT_TAG].endswith(f"/runs/{run_id}")
    assert str(store["client"].get_registered_model(name).aliases[ALIAS]) == store["version"]
    assert gate_status(store["uri"], name, store["version"])[:2] == ("passed", run_id)
    # a later FINISHED run that failed: alias removed, record replaced
    failed = influence(store, "failed", start=2000)
    assert publish(store, failed, "failed")
    assert gate_status(store["uri"], name, store["version"])[:2] == ("failed", failed)
    assert ALIAS not in store["client"].get_registered_model(name).aliases
    assert store["client"].get_run(run_id).data.tags[SUPERSEDED_TAG] == failed


def test_only_a_finished_run_with_that_verdict_publishes(store: dict[str, Any]) -> None:
    running = influence(store, "passed", start=1000, status="RUNNING")
    with pytest.raises(RuntimeError, match="only a FINISHED run"):
        publish(store, running, "passed")
    finished = influence(store, "failed", start=2000)
    with pytest.raises(RuntimeError, match="logged failed"):
        publish(store, finished, "passed")
    assert VERDICT_TAG not in version_tags(store)


def test_gate_rejects_dead_mixed_and_forged_records(store: dict[str, Any], dead_owner) -> None:
    uri, version, name = store["uri"], store["version"], store["model"]
    good = influence(store, "failed", start=1000)
    publish(store, good, "failed")
    client = store["client"]
    # the finding: tags of a killed run, gate=passed, no record -> no result, never "passed"
    client.delete_model_version_tag(name, version, VERDICT_TAG)
    dead = influence(store, "passed", start=2000, status="RUNNING", owner=dead_owner)
    client.set_model_version_tag(name, version, GATE_TAG, "passed")
    client.set_model_version_tag(name, version, RUN_TAG, dead)
    status = gate_status(uri, name, version)
    assert status.verdict is None and "no verdict record" in status.reason
    publish(store, good, "failed")
    forge(store, dead)
    status = gate_status(uri, name, version)
    assert status.verdict is None and "did not finish (RUNNING; its owner process" in status.reason
    cases = {
        "does not match": {"gate": "passed"},  # the run itself logged failed
        "does not match its influence run": {"train_md5": "other"},
        "does not exist": {"run_id": "0" * 32},
        "names other v": {"model": "other"},
        "schema": {"schema": 99},
    }  # fmt: skip
    for why, fields in cases.items():
        publish(store, good, "failed")
        set_record(store, **fields)
        status = gate_status(uri, name, version)
        assert status.verdict is None and why in status.reason, (fields, status)
    reaped = influence(store, "passed", start=3000, status="FAILED")
    forge(store, reaped)
    assert "did not finish (FAILED)" in gate_status(uri, name, version).reason
    client.set_model_version_tag(name, version, VERDICT_TAG, "{not json")
    assert "not a JSON object" in gate_status(uri, name, version).reason


def test_started_last_wins_among_finished_runs_only(store: dict[str, Any], dead_owner) -> None:
    uri, version, name = store["uri"], store["version"], store["model"]
    early = influence(store, "passed", start=1000)
    late = influence(store, "failed", start=2000)
    assert publish(store, late, "failed")
    assert not publish(store, early, "passed"), "a later-started FINISHED verdict stands"
    assert store["client"].get_run(early).data.tags[SUPERSEDED_TAG] == late
    assert gate_status(uri, name, version)[:2] == ("failed", late)
    # a record naming a later-started run that died does not stop an earlier healthy run
    dead = influence(store, "passed", start=3000, status="RUNNING", owner=dead_owner)
    forge(store, dead)
    assert publish(store, early, "passed")
    assert gate_status(uri, name, version)[:2] == ("passed", early)


def test_cli_gate_exit_codes_and_reasons(store: dict[str, Any], capsys, dead_owner) -> None:
    args = ["gate", "--model", store["model"], "--version", store["version"],
            "--tracking-uri", store["uri"]]  # fmt: skip
    assert main(args) == 2 and "no influence result" in capsys.readouterr().err
    good = influence(store, "failed", start=1000)
    publish(store, good, "failed")
    assert main(args) == 1 and good in capsys.readouterr().out
    passed = influence(store, "passed", start=2000)
    publish(store, passed, "passed")
    assert main(args) == 0 and passed in capsys.readouterr().out
    dead = influence(store, "passed", start=3000, status="RUNNING", owner=dead_owner)
    forge(store, dead)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the influence run {dead} did not finish" in err and "rerun mirrorinf run" in err


# --------------------------------------------------------------------------- kill -9, for real

KILL_DEMO = {"n_train": 200, "n_val": 60, "n_query": 10, "flip_fraction": 0.1, "n_leaks": 2,
             "seed": 0}  # fmt: skip
LENIENT = {"max_flagged_fraction": 1.0, "max_harmful_fraction": 1.0, "max_leaks": 1000}
STRICT = {"max_flagged_fraction": 0.0, "max_harmful_fraction": 0.0, "max_leaks": 0}
# where to kill: a predicate over what the test sees in the store (the run the child owns, its
# tags and status, the version's tags); the child is killed the moment it holds
KILL_AT = {
    "scoring": lambda run, mv: run is not None,
    "logging the review": lambda run, mv: run is not None and GATE_TAG in run.data.tags,
    "run finished": lambda run, mv: run is not None and run.info.status == "FINISHED",
    "publishing": lambda run, mv: run is not None and mv.get(RUN_TAG) == run.info.run_id,
    "record written": lambda run, mv: (
        run is not None and run.info.run_id in mv.get(VERDICT_TAG, "")
    ),
}


def kill_params(root: Path, version: str, gate: dict[str, Any]) -> dict[str, Any]:
    return {
        "demo": dict(KILL_DEMO),
        "model": {"name": "kill-demo", "version": int(version)},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "kill"},
        "gate": {"alias_on_pass": ALIAS, **gate},
        "threads": 1,
    }


def assert_gate_is_honest(uri: str, version: str) -> str | None:
    """`mirrorinf gate` exits 0 only on a record whose run FINISHED with that very verdict
    (checked here independently of the gate's code), and whenever the alias or the validation
    status grant a pass; returns the verdict it reports."""
    client = get_client(uri)
    code = main(["gate", "--model", "kill-demo", "--version", version, "--tracking-uri", uri])
    tags = client.get_model_version("kill-demo", version).tags
    aliases = client.get_registered_model("kill-demo").aliases or {}
    if str(aliases.get(ALIAS)) == version or tags.get(STATUS_TAG) == "passed":
        assert code == 0, "a pass is granted (alias or validation status) that the gate denies"
    if code == 0:
        record = json.loads(tags[VERDICT_TAG])
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags[GATE_TAG] == "passed", record
        assert record["run_start"] == run.info.start_time and record["gate"] == "passed"
        assert record["train_md5"] == run.data.tags["mirrorinf.data.train.md5"]
    assert code in (0, 1, 2)
    return {0: "passed", 1: "failed", 2: None}[code]


def store_state(uri: str, exp_id: str, pid: int, version: str) -> tuple[Any, dict[str, str]]:
    """(the run owned by ``pid`` or None, the version's tags), read as any client would."""
    client = get_client(uri)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{OWNER_PID}` = '{pid}'")
    return (runs[0] if runs else None), client.get_model_version("kill-demo", version).tags


@pytest.mark.slow
def test_kill_9_at_every_stage(prefect_harness: Path, tmp_path: Path) -> None:
    """SIGKILL a real `mirrorinf run` at each stage: the gate never passes on a dead or mixed
    record, the next run marks the killed run FAILED, and a later healthy run's verdict is what
    the gate reports, with no run left RUNNING."""
    from prefect.settings import PREFECT_API_URL

    from mirrorinf.flows.influence import run_influence
    from mirrorinf.params import params_from_dict
    from mirrorinf.tasks.data import load_dataset, prepare_demo
    from mirrorinf.tasks.model import train_and_register

    t0 = time.time()
    first = params_from_dict(kill_params(tmp_path, "1", STRICT), root=tmp_path)
    paths = [first.resolve(p) for p in (first.data.train, first.data.val, first.data.query)]
    prepare_demo(dict(KILL_DEMO), *paths)
    uri = first.tracking_uri()
    version = str(
        train_and_register(
            load_dataset(paths[0], name="train"), None, name="kill-demo",
            train_params={"epochs": 5, "seed": 1}, tracking_uri=uri, experiment="kill",
            artifact_location=first.artifact_location(),
        ).version
    )  # fmt: skip
    client = get_client(uri)
    exp_id = client.get_experiment_by_name("kill").experiment_id
    assert assert_gate_is_honest(uri, version) is None

    params_file = tmp_path / "params-lenient.yaml"  # data paths resolve beside it
    params_file.write_text(yaml.safe_dump(kill_params(tmp_path, version, LENIENT)))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    killed: dict[str, tuple[str, str]] = {}  # stage -> (run id, status when killed)
    landed = []
    previous: tuple[str, str] | None = None
    last_good: str | None = None
    for stage, ready in KILL_AT.items():
        log = tmp_path / f"child-{len(killed)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mirrorinf.cli", "run", "--params", str(params_file)],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        run, reaped_checked = None, previous is None
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            run, mv = store_state(uri, exp_id, proc.pid, version)
            if run is not None and not reaped_checked:  # this run started: the last one is dead
                old = client.get_run(previous[0])
                if previous[1] == "RUNNING":  # killed mid-run: marked FAILED by this run
                    assert old.info.status == "FAILED" and REAPED_TAG in old.data.tags, stage
                else:
                    assert old.info.status == "FINISHED", (stage, old.info.status)
                reaped_checked = True
            if ready(run, mv):
                break
            # poll lightly until the run logged its verdict, then closely (the windows after
            # that last tens of milliseconds)
            time.sleep(0.005 if run is not None and GATE_TAG in run.data.tags else 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        run, mv = store_state(uri, exp_id, proc.pid, version)
        assert run is not None, log.read_text()[-3000:]
        killed[stage] = (run.info.run_id, run.info.status)
        recorded = run.info.run_id in mv.get(VERDICT_TAG, "")
        landed.append((stage, proc.returncode, run.info.status, mv.get(STATUS_TAG), recorded))
        verdict = assert_gate_is_honest(uri, version)
        if run.info.status != "FINISHED":  # died mid-run: the gate holds the last good record
            assert not recorded and verdict == last_good, landed[-1]
        if recorded:
            assert verdict == "passed", landed[-1]
        last_good = verdict
        previous = (run.info.run_id, run.info.status)

    final = run_influence(params_from_dict(kill_params(tmp_path, version, STRICT), root=tmp_path))
    seconds = time.time() - t0
    print(f"\nkill points ({seconds:.0f} s):", *landed, sep="\n  ")
    statuses = {s: client.get_run(r).info.status for s, (r, _) in killed.items()}
    for stage, (run_id, status) in killed.items():
        if status == "RUNNING":
            tags = client.get_run(run_id).data.tags
            assert statuses[stage] == "FAILED" and REAPED_TAG in tags, stage
    running = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
    assert running == [], [r.info.run_id for r in running]
    assert assert_gate_is_honest(uri, version) == "failed"
    assert gate_status(uri, "kill-demo", version)[:2] == ("failed", final.run_id)
    tags = client.get_model_version("kill-demo", version).tags
    assert (tags[RUN_TAG], tags[STATUS_TAG], tags[GATE_TAG]) == (final.run_id, "failed", "failed")
    assert ALIAS not in client.get_registered_model("kill-demo").aliases
    # the sweep killed runs mid-run and runs that finished but had not recorded their verdict
    assert any(status == "RUNNING" for _, _, status, _, _ in landed), landed
    assert any(s == "FINISHED" and not rec for _, _, s, _, rec in landed), landed


def test_training_run_killed_mid_train_is_marked_failed_by_the_next(tmp_path: Path) -> None:
    """A demo training run killed with SIGKILL stays RUNNING in MLflow until the next training
    run on this host marks it FAILED (owner tags, as on influence runs)."""
    from mirrorinf.tasks.data import load_dataset, prepare_demo
    from mirrorinf.tasks.model import train_and_register

    paths = [tmp_path / f"{s}.npz" for s in ("train", "val", "query")]
    prepare_demo(dict(KILL_DEMO), *paths)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = textwrap.dedent(f"""
        from mirrorinf.tasks.data import load_dataset
        from mirrorinf.tasks.model import train_and_register
        train_and_register(
            load_dataset({str(paths[0])!r}, name="train"), None, name="slow-demo",
            train_params={{"epochs": 10_000_000, "seed": 1}}, tracking_uri={uri!r},
            experiment="train", artifact_location={str(tmp_path / "artifacts")!r},
        )
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path)
    client = get_client(uri)
    running: list[Any] = []
    deadline = time.time() + 120
    while not running and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        exp = client.get_experiment_by_name("train")
        if exp is not None:
            running = client.search_runs(
                [exp.experiment_id], filter_string="attributes.status = 'RUNNING'"
            )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(running) == 1, "the child never started its training run"
    killed = running[0].info.run_id
    assert client.get_run(killed).info.status == "RUNNING"  # nothing else can end it

    train_and_register(
        load_dataset(paths[0], name="train"), None, name="slow-demo",
        train_params={"epochs": 3, "seed": 2}, tracking_uri=uri, experiment="train",
        artifact_location=str(tmp_path / "artifacts"),
    )  # fmt: skip
    after = client.get_run(killed)
    assert after.info.status == "FAILED"
    assert "training run of slow-demo" in after.data.tags[REAPED_TAG]
