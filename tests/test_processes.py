"""Servers a command starts die with it and never hold its output open (real subprocesses).

``mirrorinf run`` without PREFECT_API_URL starts a temporary Prefect API; ``mirrorinf ui`` starts
an MLflow server. Before mirrorinf.procs, ``kill -9`` of the command left the Prefect API (about
230 MB, adopted by init) listening and holding ``mirrorinf run | tail`` open, SIGTERM to ``ui``
left its MLflow server running, and a Dask run hung about 70 s after its summary.
Linux only: processes are found through /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

TINY = {
    "demo": {"n_train": 60, "n_val": 20, "n_query": 6, "n_leaks": 1},
    "model": {"name": "procs-demo", "train": {"epochs": 10}},
    "queries": {"max_queries": 6},
    "threads": 1,
}


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children, grandchildren, ...)."""
    out, todo = [], _children(pid)
    while todo:
        kid = todo.pop()
        out.append(kid)
        todo += _children(kid)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Command:
    """``mirrorinf ARGS`` as a user's pipe runs it (``mirrorinf run | cat``): stdout+stderr to a
    pipe read to EOF by a thread, each line with the time it arrived."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirrorinf.cli", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[tuple[float, str]] = []
        self.eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: set[int] = set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))
        self.eof.set()

    def tree(self) -> list[int]:
        """Its descendants now; all ever seen are remembered for the cleanup."""
        kids = descendants(self.proc.pid)
        self.seen.update(kids)
        return kids

    def has_child(self, needle: str) -> bool:
        return any(needle in cmdline(k) for k in self.tree())

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def cleanup(self) -> None:
        """Whatever it started and left behind (a failing test) is killed, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No PREFECT_API_URL: the command starts its own temporary API, as on a fresh checkout."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    out["PREFECT_HOME"] = str(tmp_path / ".prefect")
    return out


@pytest.fixture
def command(tmp_path: Path, env: dict[str, str]) -> Iterator[object]:
    started: list[Command] = []

    def start(args: list[str], params: dict | None = None) -> Command:
        if params is not None:
            (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        started.append(Command(args, tmp_path, env))
        return started[-1]

    yield start
    for cmd in started:
        cmd.cleanup()


def assert_all_gone(cmd: Command, pids: list[int]) -> None:
    assert pids, "the command started no child process"
    assert cmd.eof.wait(10), "the command's output pipe is still held open by a child"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: cmdline(p)[:120] for p in pids if alive(p)}
    assert not left, f"left running: {left}"


def test_kill_9_of_run_stops_its_prefect_api_and_frees_the_pipe(command: object) -> None:
    run = command(["run", "--params", "params.yaml"], TINY)  # type: ignore[operator]
    wait_for(lambda: run.has_child("prefect.server.api.server:create_app"), 180, "the API")
    time.sleep(1.0)  # let it bind its port
    pids = run.tree()
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    assert_all_gone(run, pids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_ui_stops_its_mlflow_server(command: object, tmp_path: Path, sig: int) -> None:
    port = free_port()
    from mirrorinf.tasks.tracking import get_client

    get_client(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # a project's store (ui refuses none)
    ui = command(["ui", "--port", str(port)], {})  # type: ignore[operator]

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert ui.proc.poll() is None, ui.output()
            return False

    wait_for(up, 120, "the MLflow UI")
    pids = ui.tree()
    ui.proc.send_signal(sig)
    code = ui.proc.wait(20)
    assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL), ui.output()
    assert_all_gone(ui, pids)


def test_dask_run_ends_soon_after_its_summary(command: object) -> None:
    """The temporary API stopped before this process's queued logs were sent: the run hung
    about 70 s after its summary, then printed "Error logging to API"."""
    params = {**TINY, "runner": "dask", "dask": {"workers": 1}, "cache": False}
    run = command(["run", "-v", "--params", "params.yaml"], params)  # type: ignore[operator]
    code = run.proc.wait(400)
    end = time.monotonic()
    assert run.eof.wait(10)
    out = run.output()
    assert code == 0, out[-3000:]
    summary = next(t for t, line in run.lines if line.startswith("MLflow run:"))
    assert end - summary < 20, f"exited {end - summary:.1f} s after its summary"
    assert "Error logging to API" not in out
