"""Servers a command starts die with it, even on ``kill -9``, and never hold its output open.

A server (the temporary Prefect API, the MLflow UI) runs under a small supervisor,
``python -m mirrorinf.procs PARENT_PID -- CMD...``, in a session of its own, with the server in a
process group of its own below it. The supervisor asks Linux to signal it when its parent dies
(``PR_SET_PDEATHSIG``) and also polls its parent pid (other systems, or a parent that died before
the prctl); either way, or on SIGTERM/SIGINT/SIGHUP, it stops the server's whole group (SIGTERM,
then SIGKILL after a grace period) and exits. The server gets the same death signal, so it also
goes if the supervisor itself is killed. Stdlib only: no orchestration imports here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["die_with_parent", "spawn", "stop"]

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 5.0  # SIGTERM -> SIGKILL for a server's group
POLL_SECONDS = 0.25  # the supervisor's check of its parent pid


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Linux: deliver ``sig`` to this process when the thread that started it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def spawn(
    cmd: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under a supervisor tied to this process; output appended to ``log`` (never
    this process's stdout/stderr) or, with ``log=None``, inherited (the server dies with us).

    The caller must keep the thread that calls this alive while the server is needed (Linux
    sends the death signal when that thread ends); the CLI calls it from the main thread.
    """
    args = [sys.executable, "-m", "mirrorinf.procs", str(os.getpid()), "--", *cmd]
    sink: Any = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sink = open(log, "ab")  # noqa: SIM115 (the child holds it; we close our copy below)
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT if sink is not None else None,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the command, which stops the server itself
            close_fds=True,
        )
    finally:
        if sink is not None:
            sink.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = GRACE_SECONDS + 5) -> int | None:
    """Stop a server started by :func:`spawn` (its supervisor stops the group); the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _supervise(parent: int, cmd: list[str]) -> int:
    """Run ``cmd`` in its own group until it exits, the parent dies or we are told to stop."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        return 1
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    # the supervisor is single-threaded, so preexec_fn is safe here
    child = subprocess.Popen(cmd, process_group=0, preexec_fn=die_with_parent)
    while child.poll() is None and not stopping and os.getppid() == parent:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(POLL_SECONDS)
    if child.poll() is None:
        _killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(GRACE_SECONDS)
    _killpg(child.pid, signal.SIGKILL)  # whatever is left of its group (grandchildren too)
    child.wait()
    if stopping:
        return 128 + stopping[0]
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python -m mirrorinf.procs PARENT_PID -- CMD...")
    sys.exit(_supervise(int(sys.argv[1]), sys.argv[3:]))
