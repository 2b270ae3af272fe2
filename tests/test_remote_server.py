"""Against a real ``mlflow server`` (SQLite backend, served artifacts, 127.0.0.1): the flow's
review lands in the server's artifact store, not on the client, and the verdict is read back
through the REST API alone, as a CI job on another machine would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirrorinf.flows.influence import run_influence
from mirrorinf.params import params_from_dict

pytestmark = pytest.mark.slow

DEMO = {"n_train": 300, "n_val": 100, "n_query": 20, "n_leaks": 2, "flip_fraction": 0.1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` serving artifacts from its own folder; yields (URL, that folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.5)
        yield url, root / "artifacts"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _rest(url: str, path: str, **query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def test_flow_against_a_tracking_server_read_back_over_rest(
    prefect_harness: Path, server: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = server
    params = params_from_dict(
        {
            "demo": DEMO,
            "model": {"name": "remote-demo", "train": {"epochs": 60}},
            "mlflow": {"tracking_uri": url, "experiment": "remote"},
            "threads": 1,
        },
        root=tmp_path,
    )
    assert params.artifact_location() is None  # the server decides where artifacts go
    result = run_influence(params)
    assert result.verdict == "failed"  # the demo plants flips and leaks

    # nothing of the review on the client's disk: no artifact folder, no local store
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow-artifacts:").exists()
    # ... and it is in the server's artifact store
    reports = list(served.rglob("report.md"))
    assert reports, f"no report.md under the server's artifact root {served}"

    # the verdict through the REST API only: one call gives the whole record
    mv = _rest(url, "/api/2.0/mlflow/model-versions/get", name="remote-demo",
               version=str(result.model["version"]))["model_version"]  # fmt: skip
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    record = json.loads(tags["mirrorinf.verdict"])
    assert record["gate"] == "failed" and record["run_id"] == result.run_id
    assert tags["mirrorinf.validation_status"] == "failed"
    run = _rest(url, "/api/2.0/mlflow/runs/get", run_id=record["run_id"])["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    listed = _rest(url, "/api/2.0/mlflow/artifacts/list", run_id=record["run_id"])
    assert "report.md" in {f["path"] for f in listed.get("files", [])}

    # the gate command against the server agrees
    out = subprocess.run(
        [sys.executable, "-m", "mirrorinf.cli", "gate", "--model", "remote-demo",
         "--version", str(result.model["version"]), "--tracking-uri", url],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert not (tmp_path / "mlruns").exists()  # gate created no local store either
