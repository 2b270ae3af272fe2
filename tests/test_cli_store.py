"""Which MLflow store the CLI uses: the project's params.yaml from any subfolder, never a new
empty store in whatever folder the command happens to run in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mirrorinf.cli import main
from mirrorinf.tasks.tracking import get_client


def test_gate_outside_a_project_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["gate", "--model", "m", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "no params.yaml here or in a parent folder" in err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_gate_from_a_subfolder_finds_the_projects_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"mlflow": {"tracking_uri": "sqlite:///store/m.db"}})
    )
    client = get_client(f"sqlite:///{tmp_path}/store/m.db")
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "nowhere"))
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert main(["gate", "--model", "m", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" not in err and "m v1:" in err  # the project's store, read
    assert not (sub / "mlruns").exists() and not (sub / "mlflow.db").exists()


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", ["gate", "run"])
def test_unreachable_tracking_server_exits_2_promptly(command: str, tmp_path: Path) -> None:
    """A tracking server that is down (or a mistyped port): MLflow's default retries (7, backoff
    factor 2) held ``gate`` about 4 minutes per call and a ``run`` whose server died mid-way 21
    minutes, then a traceback (exit 3). Now a short retry, then one line, exit 2."""
    import os
    import subprocess
    import sys
    import time

    url = f"http://127.0.0.1:{_dead_port()}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": "file", "train": "t.npz", "val": "t.npz", "query": "t.npz"},
        "model": {"name": "m", "version": 1}, "mlflow": {"tracking_uri": url},
    }))  # fmt: skip
    argv = ["gate", "--model", "m", "--version", "1"] if command == "gate" else ["run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorinf.cli", *argv], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    took = time.monotonic() - t0
    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot reach the MLflow tracking server at {url}" in err, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert took < 120, took


def test_unreachable_prefect_api_exits_2_with_one_line(tmp_path: Path) -> None:
    """PREFECT_API_URL naming an API that is down: a RuntimeError traceback (exit 3); a server
    that died mid-run ended the same way (httpx.ConnectError) after the run was logged."""
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "demo"}}))
    url = f"http://127.0.0.1:{_dead_port()}/api"
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorinf.cli", "run"], cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot reach the Prefect API at {url}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_prefect_api_dying_after_the_run_says_what_was_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Prefect API died after the influence run FINISHED and its verdict was published: the
    one line says so (read back from MLflow by the run id) instead of only "rerun"; a run left
    RUNNING is reported with its state and "rerun"."""
    from mirrorinf.cli import _unreachable
    from mirrorinf.tasks import tracking
    from mirrorinf.tasks.verdict import GATE_TAG, tag_model_version

    uri = f"sqlite:///{tmp_path}/m.db"
    client = get_client(uri)
    exp = client.create_experiment("e")
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "nowhere"))
    tags = {"mirrorinf.model.name": "m", "mirrorinf.model.version": "1", GATE_TAG: "passed"}
    done = client.create_run(exp, tags=tags).info.run_id
    client.set_terminated(done, "FINISHED")
    tag_model_version(uri, "m", "1", verdict="passed", run_id=done, alias_on_pass=None)
    url = f"http://127.0.0.1:{_dead_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setattr(tracking, "_started", [(uri, done)])
    said = _unreachable(RuntimeError(f"Failed to reach API at {url}/"))
    assert said is not None and f"cannot reach the Prefect API at {url}" in said
    assert f"MLflow run {done} is FINISHED and m v1 was published with gate PASSED" in said
    assert "nothing needs a rerun" in said and "then rerun" not in said

    left = client.create_run(exp, tags=tags).info.run_id  # the API died mid-run
    monkeypatch.setattr(tracking, "_started", [(uri, left)])
    said = _unreachable(RuntimeError(f"Failed to reach API at {url}/"))
    assert said is not None and f"MLflow run {left} is RUNNING" in said
    assert "its verdict not published for m v1" in said and said.endswith("then rerun")


def test_prefect_client_retries_are_short_unless_the_user_set_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_tool_env shortens Prefect's client retries (a dead API was ~1 min per request) only
    when neither the environment nor the project's Prefect profile sets them."""
    from mirrorinf.tasks.env import set_tool_env

    monkeypatch.delenv("PREFECT_CLIENT_MAX_RETRIES", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    set_tool_env(tmp_path)
    assert os.environ["PREFECT_CLIENT_MAX_RETRIES"] == "3"
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "7")
    set_tool_env(tmp_path)
    assert os.environ["PREFECT_CLIENT_MAX_RETRIES"] == "7"
    monkeypatch.delenv("PREFECT_CLIENT_MAX_RETRIES")
    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "profiles.toml").write_text(
        '[profiles.local]\nPREFECT_CLIENT_MAX_RETRIES = "9"\n'
    )
    set_tool_env(tmp_path)
    assert "PREFECT_CLIENT_MAX_RETRIES" not in os.environ


def test_events_for_a_dead_prefect_api_are_dropped_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the one-line "cannot reach the Prefect API", the events Prefect still queued were
    each retried against the dead API at exit (about 7 s an item) and each printed as a
    multi-kilobyte error; the CLI now drops them."""
    from prefect.events import Event
    from prefect.events.worker import EventsWorker

    from mirrorinf.tasks.server import abandon_prefect_queues

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_dead_port()}/api")
    worker = EventsWorker.instance()
    try:
        for i in range(5):
            worker.send(Event(event="mirrorinf.test", resource={"prefect.resource.id": f"r{i}"}))
        assert abandon_prefect_queues() == 5
        assert worker._queue.qsize() == 0
    finally:
        EventsWorker.drain_all(timeout=30)


def test_prefect_delivery_failures_show_as_one_short_line() -> None:
    """Each event Prefect could not send to a dead API was logged with the whole event (kB of
    JSON a line, one per queued event); the CLI shows the first as one line and drops the rest."""
    import logging

    from mirrorinf.cli import _quiet_prefect

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    services = logging.getLogger("prefect._internal.concurrency")
    keep = Keep()
    services.addHandler(keep)
    before = list(services.filters)
    try:
        _quiet_prefect(False, False)
        _quiet_prefect(False, False)  # twice: one filter
        event = "Event(" + "x" * 3000 + ")"
        for _ in range(4):
            services.error("Service %r failed to process item %r", "EventsWorker", event)
        services.error("Service %r failed with %s pending items.", "EventsWorker", 3)
    finally:
        services.removeHandler(keep)
        for added in [f for f in services.filters if f not in before]:
            services.removeFilter(added)
    assert seen[0] == (
        "Prefect's EventsWorker could not send to the Prefect API; later failures not shown"
    )
    assert seen[1:] == ["Service 'EventsWorker' failed with 3 pending items."]
