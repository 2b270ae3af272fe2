"""Triggering after training, for real: the example script (a user's own model, registered in a
temp MLflow store and scored through ``mirrorinf.trigger``), and a deployment served by
``mirrorinf serve`` that a ``mirrorinf.model.registered`` event starts.

The Prefect API is the test harness's temporary server: it runs the server-side services that
event triggers need (ReactiveTriggers and Actions are marked to run in ephemeral servers). The
served deployment runs in a ``mirrorinf serve`` subprocess, which runs each flow run in its own
subprocess, exactly as a user's would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

import mirrorinf
from mirrorinf.cli import build_parser
from mirrorinf.flows.trigger import FLOW_NAME, model_registered_trigger, pinned_params
from mirrorinf.params import params_from_dict
from mirrorinf.tasks.events import MODEL_REGISTERED, emit_model_registered, model_resource
from mirrorinf.tasks.tracking import get_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_model.py"
MODEL = "breast-mlp"  # the example's registered model name
POLL_LIMIT_S = 120  # bound on waiting for a triggered flow run
SERVED = "test-serve"  # deployment name; not trigger's default, so the example runs in-process
DATA = {"source": "file", "train": "train.npz", "val": "val.npz", "query": "query.npz"}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A temporary Prefect API (the test harness); yields its URL.

    Prefect's events worker is a per-process singleton bound to the API URL it first saw: it is
    drained on entry and exit, so events go to this harness, not another test module's.
    """
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings(updates={"results.local_storage_path": str(storage)}),
    ):
        EventsWorker.drain_all()
        yield str(PREFECT_API_URL.value())
        EventsWorker.drain_all()


def _die_with_parent() -> None:
    """Linux: the served process gets SIGTERM if pytest dies (no orphaned runner)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _env(api_url: str, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's scratch folder: data files, MLflow store, params.yaml for ``mirrorinf serve``."""
    work = tmp_path_factory.mktemp("example")
    (work / "params.yaml").write_text(yaml.safe_dump({"data": DATA, "threads": 1}))
    return work


@pytest.fixture(scope="module")
def serve_process(prefect_api: str, work: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``mirrorinf serve`` in a subprocess (started early: it imports while the example runs)."""
    log = work / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirrorinf.cli", "serve", "--name", SERVED, "--model", MODEL],
            cwd=work,
            env=_env(prefect_api, work / ".prefect"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        yield proc, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def example_dir(prefect_api: str, work: Path, serve_process: Any) -> Path:
    """The example run as a user runs it (a script in a scratch folder), against the API.

    The served deployment has another name than ``trigger``'s default, so the example's
    ``trigger`` call runs the flow in its own process.
    """
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=work,
        env=_env(prefect_api, work / ".prefect"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (work / "example.out").write_text(out.stdout)
    assert "gate passed: " in out.stdout, out.stdout
    # polite in a training script: no Prefect progress lines or tracebacks in its output
    chatter = [ln for ln in (out.stdout + out.stderr).splitlines() if "Finished in state" in ln]
    assert not chatter and "Traceback" not in out.stderr, out.stderr[-3000:]
    return work


def _store(work: Path) -> str:
    return f"sqlite:///{work}/mlruns/mlflow.db"


def test_example_trains_registers_and_gets_a_verdict(example_dir: Path) -> None:
    client = get_client(_store(example_dir))
    mv = client.get_model_version(MODEL, "1")
    # clean breast-cancer labels and a well-fit model: nothing flagged, no leak (the gate's
    # calibration benchmark passes every clean run), so anything but "passed" is a regression
    assert mv.tags["mirrorinf.gate"] == "passed", example_dir.joinpath("example.out").read_text()
    run = client.get_run(mv.tags["mirrorinf.run_id"])
    assert run.data.tags["mirrorinf.model.name"] == MODEL and run.info.status == "FINISHED"
    code = EXAMPLE.read_text().split("import mirrorinf\n", 1)[1]
    user_lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(user_lines) < 30, len(user_lines)


def test_pinned_params_and_event_shape(tmp_path: Path) -> None:
    base = params_from_dict({"model": {"alias": "champion"}, "data": DATA}, root=tmp_path)
    pinned = pinned_params("m", "3", base)
    assert (pinned.model.name, pinned.model.version, pinned.model.alias) == ("m", 3, None)
    assert pinned.root == tmp_path.resolve() and pinned.data.train == "train.npz"
    assert model_resource("m", 3) == {
        "prefect.resource.id": "mlflow.model.m.3",
        "mlflow.model.name": "m",
        "mlflow.model.version": "3",
    }
    trig = model_registered_trigger("m")
    assert trig.expect == {MODEL_REGISTERED}
    assert trig.parameters["version"] == "{{ event.resource['mlflow.model.version'] }}"
    assert mirrorinf.trigger.__module__ == "mirrorinf.flows.trigger"
    assert build_parser().parse_args(["serve", "--model", "m"]).command == "serve"


def test_emit_without_api_is_a_no_op() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert emit_model_registered("m", 1) is None  # and no temporary server was started


def _runs_of(deployment_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def _wait(what: str, check: Any, deadline: float, log: Path) -> Any:
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; serve log:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(serve_process: tuple[subprocess.Popen, Path], example_dir: Path) -> tuple[Any, Path]:
    """The deployment ``mirrorinf serve`` created, and the serve log."""
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.exceptions import ObjectNotFound

    proc, log = serve_process

    def deployment() -> Any:
        assert proc.poll() is None, log.read_text()[-4000:]
        with prefect_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(f"{FLOW_NAME}/{SERVED}")
            except ObjectNotFound:
                return None

    return _wait("the deployment", deployment, time.monotonic() + 60, log), log


def test_event_and_trigger_both_run_the_deployment(
    served: tuple[Any, Path], example_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model-registered event for a new version 2, and ``trigger`` for version 1 (submitted,
    since the deployment exists), run side by side; both versions get their gate tag."""
    deployment, log = served
    client = get_client(_store(example_dir))
    v1 = client.get_model_version(MODEL, "1")
    logged = client.get_logged_model(v1.source.removeprefix("models:/"))  # v1.source: models:/m-..
    v2 = client.create_model_version(MODEL, source=logged.artifact_location, run_id=v1.run_id)
    assert "mirrorinf.gate" not in v2.tags
    run_id_before = v1.tags["mirrorinf.run_id"]
    t0 = time.monotonic()
    assert emit_model_registered(MODEL, v2.version) is not None
    monkeypatch.chdir(example_dir)
    params = {"data": DATA, "threads": 1}
    submitted = mirrorinf.trigger(MODEL, 1, params=params, deployment=f"{FLOW_NAME}/{SERVED}")
    assert isinstance(submitted, UUID)

    def finished() -> list[Any] | None:
        runs = [r for r in _runs_of(deployment.id) if r.state is not None]
        failed = [r for r in runs if r.state.is_final() and not r.state.is_completed()]
        assert not failed, f"{failed[0].state}\n{log.read_text()[-4000:]}"
        done = [r for r in runs if r.state.is_completed()]
        return done if len(done) == 2 else None

    runs = {r.id: r for r in _wait("both flow runs", finished, t0 + POLL_LIMIT_S, log)}
    print(f"event + trigger -> two completed flow runs: {time.monotonic() - t0:.1f} s")
    assert submitted in runs
    by_event = next(r for r in runs.values() if r.id != submitted)
    assert by_event.parameters["model_name"] == MODEL
    assert by_event.parameters["version"] == str(v2.version)
    assert runs[submitted].parameters["params"]["data"]["train"] == "train.npz"
    assert runs[submitted].parameters["root"] == str(example_dir.resolve())
    for version in (v2.version, "1"):
        tags = client.get_model_version(MODEL, version).tags
        assert tags["mirrorinf.gate"] == "passed"  # the same clean model and data as above
        influence = client.get_run(tags["mirrorinf.run_id"]).data.tags
        assert influence["mirrorinf.model.version"] == str(version)
    assert client.get_model_version(MODEL, "1").tags["mirrorinf.run_id"] != run_id_before
