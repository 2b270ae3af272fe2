"""The temporary Prefect API of a command, tied to it: it dies with the command (one tool: Prefect).

With PREFECT_API_URL unset, Prefect starts a temporary API itself (``SubprocessASGIServer``) as a
plain child that inherits the caller's stdout/stderr and outlives a ``kill -9`` (adopted by init,
holding ``mirrorinf run | tail`` open). :func:`prefect_api` starts the same server (Prefect's
class: port choice, health wait, retry on a taken port) under :mod:`mirrorinf.procs`' supervisor,
its output in ``PREFECT_HOME/api-server.log``, and uses it the way Prefect's own test harness
does: the API URL in the settings (and the environment, for Dask workers), the server registered
as Prefect's default so nothing starts a second one, logs and events drained before it stops.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import prefect
import prefect.context
import prefect.settings
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings

from mirrorinf import procs

__all__ = ["PrefectAPI", "drain_prefect_workers", "prefect_api"]

LOG_NAME = "api-server.log"


class PrefectAPI(SubprocessASGIServer):
    """Prefect's temporary API server, started under a supervisor that dies with this process."""

    _instances: ClassVar[dict[int | None, SubprocessASGIServer]] = {}  # apart from Prefect's

    @property
    def log_path(self) -> Path:
        """Where the server's output goes (never the command's stdout/stderr)."""
        return Path(PREFECT_HOME.value()) / LOG_NAME

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # the command and environment of SubprocessASGIServer._run_uvicorn_command (Prefect
        # 3.9), run by the supervisor with the output to a log file
        cmd = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        return procs.spawn(cmd, log=self.log_path, env=env)

    def stop(self) -> None:
        """Stop the supervisor (it stops the server's whole process group), then Prefect's
        bookkeeping."""
        if self.server_process is not None:
            procs.stop(self.server_process)
            self.server_process = None
        super().stop()


def drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process to the API (before it stops):
    otherwise they are retried against a dead server at exit ("Error logging to API", ~70 s)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:  # as prefect.testing.utilities.prefect_test_harness drains
        for worker in (APILogWorker, EventsWorker):
            result = worker.drain_all(timeout=30, at_exit=False)
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


@contextmanager
def prefect_api(timeout: int | None = None) -> Iterator[str]:
    """The Prefect API URL for this block: the configured one (PREFECT_API_URL, a profile, a test
    harness), else a temporary server that lives as long as the block and dies with the process.

    Call it from the thread that runs the block (Linux signals the server when that thread
    ends).
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = PrefectAPI()
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start(timeout=timeout)
        stack.callback(_restore_env, os.environ.get("PREFECT_API_URL"))
        os.environ["PREFECT_API_URL"] = server.api_url  # subprocesses (Dask workers) too
        stack.enter_context(prefect.settings.temporary_settings({PREFECT_API_URL: server.api_url}))
        global_ctx = getattr(prefect.context, "_temporary_global_settings_context", None)
        if global_ctx is not None:  # threads started from an older context see it too
            stack.enter_context(global_ctx(prefect.context.get_settings_context()))
        previous = SubprocessASGIServer._instances.get(None)
        SubprocessASGIServer._instances[None] = server  # internal callers find this one
        stack.callback(_restore_default, previous)
        stack.callback(drain_prefect_workers)  # runs first on the way out, error or not
        yield server.api_url


def _restore_env(value: str | None) -> None:
    if value is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = value


def _restore_default(previous: SubprocessASGIServer | None) -> None:
    if previous is None:
        SubprocessASGIServer._instances.pop(None, None)
    else:
        SubprocessASGIServer._instances[None] = previous
