"""Concurrent influence runs, with real components (Prefect harness, SQLite MLflow, real flows).

The rule under test (tasks/verdict.py): once a run is FINISHED, its verdict record and the tags
derived from it (gate, run id, report link, description, validation status) and the pass alias
are written under a per-model lock; among FINISHED runs the one that *started* last (MLflow start
time, then run id) wins, and a run that loses is tagged ``mirrorinf.superseded_by`` = the winner.
So whatever the interleaving, the record and the version's tags all name one run,
``gate_status`` agrees with them, and every run's artifacts are its own (runs killed with
SIGKILL: tests/test_verdict.py). Scoring of one model version is serialised too, so the second
run reuses the first's cached scores instead of scoring again, and the demo model is never
registered twice.

Two in-process runs (threads), and a ``mirrorinf run`` process beside an in-process run, are
tested; the demo is as small as the end-to-end file's (400 training images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mirrorinf.flows.influence import InfluenceResult, run_influence
from mirrorinf.params import Params, params_from_dict
from mirrorinf.tasks.data import load_dataset, prepare_demo
from mirrorinf.tasks.model import train_and_register
from mirrorinf.tasks.tracking import GATE_TAG, REPORT_TAG, RUN_TAG, SUPERSEDED_TAG, get_client
from mirrorinf.tasks.verdict import STATUS_TAG, VERDICT_TAG, gate_status

pytestmark = pytest.mark.slow

MODEL = "conc-demo"
ALIAS = "influence-passed"
SMALL_DEMO = {"n_train": 400, "n_val": 100, "n_query": 30, "flip_fraction": 0.1, "n_leaks": 5,
              "seed": 0}  # fmt: skip
LENIENT = {"max_flagged_fraction": 1.0, "max_harmful_fraction": 1.0, "max_leaks": 1000}
STRICT = {"max_flagged_fraction": 0.0, "max_harmful_fraction": 0.0, "max_leaks": 0}


def make(
    project: Path,
    version: int | None = None,
    gate: dict[str, Any] | None = None,
    sharding: dict[str, Any] | None = None,
) -> Params:
    """Params for the small demo in ``project``; a pinned ``version``, gate overrides, shards."""
    raw: dict[str, Any] = {
        "demo": dict(SMALL_DEMO),
        "model": {"name": MODEL, "version": version},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "conc"},
        "gate": {"alias_on_pass": ALIAS, **(gate or {})},
        "threads": 1,
        "sharding": sharding or {},
    }
    return params_from_dict(raw, root=project)


@pytest.fixture(scope="module")
def project(prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with the demo data and two registered versions (training seeds 1 and 2)."""
    root = tmp_path_factory.mktemp("conc-project")
    params = make(root)
    paths = [params.resolve(p) for p in (params.data.train, params.data.val, params.data.query)]
    prepare_demo(dict(SMALL_DEMO), *paths)
    train = load_dataset(paths[0], name="train")
    uri = params.tracking_uri()
    versions = [
        train_and_register(
            train, None, name=MODEL, train_params={"epochs": 30, "seed": seed},
            tracking_uri=uri, experiment="conc", artifact_location=params.artifact_location(),
        ).version
        for seed in (1, 2)
    ]  # fmt: skip
    return {"root": root, "uri": uri, "versions": [str(v) for v in versions]}


def run_together(*params: Params) -> list[InfluenceResult]:
    """Run the flows at once, one thread each; results in the order given."""
    with ThreadPoolExecutor(len(params)) as pool:
        futures = [pool.submit(run_influence, p) for p in params]
        return [f.result() for f in futures]


def assert_own_artifacts(
    uri: str, run_id: str, version: str, verdict: str, gate: dict[str, Any], dst: Path
) -> np.ndarray:
    """The run is FINISHED and everything it logged belongs to it; returns its pairwise scores."""
    client = get_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mirrorinf.model.version"] == version
    assert run.data.tags[GATE_TAG] == verdict
    local = Path(client.download_artifacts(run_id, "", dst_path=str(dst)))
    summary = json.loads((local / "summary.json").read_text())
    assert summary["verdict"] == verdict
    assert json.loads((local / "checks" / "gx_result.json").read_text())["success"] is (
        verdict == "passed"
    )
    logged_gate = json.loads((local / "params.json").read_text())["gate"]
    assert {k: logged_gate[k] for k in gate} == gate
    assert f"v{version}" in (local / "report.md").read_text()
    pairwise = np.load(local / "scores" / "pairwise.npy")
    assert pairwise.shape == (400, 30) and np.isfinite(pairwise).all()
    return pairwise


def assert_one_winner(uri: str, version: str, runs: dict[str, str]) -> str:
    """The version's tags all name one of ``runs`` ({run id: verdict}): the one started last.

    Returns the winner's run id; every other run is tagged superseded by it.
    """
    client = get_client(uri)
    mv = client.get_model_version(MODEL, version)
    winner = mv.tags[RUN_TAG]
    assert winner in runs, (winner, runs)
    starts = {r: (client.get_run(r).info.start_time, r) for r in runs}
    assert winner == max(runs, key=starts.__getitem__), "the run started last wins"
    assert mv.tags[GATE_TAG] == runs[winner]
    assert mv.tags[REPORT_TAG].endswith(f"/runs/{winner}")
    assert winner in (mv.description or "")
    record = json.loads(mv.tags[VERDICT_TAG])
    assert (record["run_id"], record["gate"]) == (winner, runs[winner])
    assert mv.tags[STATUS_TAG] == runs[winner]
    assert gate_status(uri, MODEL, version)[:2] == (runs[winner], winner)
    for run_id in runs:
        tags = client.get_run(run_id).data.tags
        assert tags.get(SUPERSEDED_TAG) == (None if run_id == winner else winner), run_id
    return winner


def test_two_runs_same_version_in_threads(project: dict[str, Any], tmp_path: Path) -> None:
    uri, version = project["uri"], project["versions"][0]
    lenient, strict = (make(project["root"], int(version), g) for g in (LENIENT, STRICT))
    passed, failed = run_together(lenient, strict)
    assert (passed.verdict, failed.verdict) == ("passed", "failed")
    scores = [
        assert_own_artifacts(uri, r.run_id, version, r.verdict, g, tmp_path / r.run_id)
        for r, g in ((passed, LENIENT), (failed, STRICT))
    ]
    np.testing.assert_array_equal(scores[0], scores[1])  # same model, data, config
    assert passed.cache_hit or failed.cache_hit, "one scoring of the version, then the cache"
    winner = assert_one_winner(uri, version, {r.run_id: r.verdict for r in (passed, failed)})
    aliases = get_client(uri).get_registered_model(MODEL).aliases
    assert (str(aliases.get(ALIAS)) == version) == (winner == passed.run_id)


def test_two_runs_different_versions_do_not_mix(project: dict[str, Any], tmp_path: Path) -> None:
    uri, (v1, v2) = project["uri"], project["versions"]
    one, two = run_together(
        make(project["root"], int(v1), LENIENT), make(project["root"], int(v2), STRICT)
    )
    assert (one.model["version"], two.model["version"]) == (v1, v2)
    assert (one.verdict, two.verdict) == ("passed", "failed")
    s1 = assert_own_artifacts(uri, one.run_id, v1, "passed", LENIENT, tmp_path / "one")
    s2 = assert_own_artifacts(uri, two.run_id, v2, "failed", STRICT, tmp_path / "two")
    assert not np.allclose(s1, s2), "two different models scored the same"
    client = get_client(uri)
    for version, result in ((v1, one), (v2, two)):
        mv = client.get_model_version(MODEL, version)
        assert mv.tags[RUN_TAG] == result.run_id and mv.tags[GATE_TAG] == result.verdict
        assert mv.tags[REPORT_TAG].endswith(f"/runs/{result.run_id}")
        assert gate_status(uri, MODEL, version)[:2] == (result.verdict, result.run_id)
    assert str(client.get_registered_model(MODEL).aliases[ALIAS]) == v1


def test_cli_process_and_in_process_run_same_version(
    project: dict[str, Any], tmp_path: Path
) -> None:
    """A ``mirrorinf run`` process and a run in this process, one store, one version, sharded."""
    from prefect.settings import PREFECT_API_URL

    uri, version = project["uri"], project["versions"][1]
    client = get_client(uri)
    before = {r.info.run_id for r in _version_runs(client, version)}
    sharding = {"size": 100, "dir": "outputs/shards"}
    strict = make(project["root"], int(version), STRICT, sharding).model_dump(mode="json")
    params_file = project["root"] / "params-conc-strict.yaml"  # data paths resolve beside it
    params_file.write_text(yaml.safe_dump(strict))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirrorinf.cli", "run", "--params", str(params_file)],
        cwd=project["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        here = run_influence(make(project["root"], int(version), LENIENT, sharding))
    finally:
        output = proc.communicate(timeout=180)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    runs = {r.info.run_id: r for r in _version_runs(client, version) if r.info.run_id not in before}
    assert len(runs) == 2 and here.run_id in runs, output[-3000:]
    verdicts = {rid: r.data.tags[GATE_TAG] for rid, r in runs.items()}
    assert verdicts[here.run_id] == "passed" and sorted(verdicts.values()) == ["failed", "passed"]
    for rid, verdict in verdicts.items():
        gate = LENIENT if verdict == "passed" else STRICT
        assert_own_artifacts(uri, rid, version, verdict, gate, tmp_path / rid)
    winner = assert_one_winner(uri, version, verdicts)
    aliases = client.get_registered_model(MODEL).aliases
    assert (str(aliases.get(ALIAS)) == version) == (verdicts[winner] == "passed")
    log = project["root"] / "outputs" / "shards" / f"{MODEL}-v{version}" / "computations.log"
    assert sorted(log.read_text().split()) == [f"{s}:{s + 100}" for s in (0, 100, 200, 300)], (
        "each shard scored once: the later run reused the earlier one's shards"
    )


def _version_runs(client: Any, version: str) -> list[Any]:
    exp = client.get_experiment_by_name("conc")
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mirrorinf.model.version` = '{version}' "
        f"and tags.`mirrorinf.model.name` = '{MODEL}'",
    )
