"""The temporary Prefect API of a command, tied to it: it dies with the command (one tool: Prefect).

With PREFECT_API_URL unset, Prefect starts a temporary API itself (``SubprocessASGIServer``) as a
plain child that inherits the caller's stdout/stderr and outlives a ``kill -9`` (adopted by init,
holding ``mirrorinf run | tail`` open). :func:`prefect_api` starts the same server (Prefect's
class: port choice, health wait, retry on a taken port) under :mod:`mirrorinf.procs`' supervisor,
its output in ``PREFECT_HOME/api-server.log``, and uses it the way Prefect's own test harness
does: the API URL in the settings (and the environment, for Dask workers), the server registered
as Prefect's default so nothing starts a second one, logs and events drained before it stops.

Its store is ``PREFECT_HOME`` (the project's ``.prefect/``), and nothing grows there without
bound: the server persists no events (nothing reads them: no UI, no automations), the entry
points keep only the newest flow runs (:func:`prune_flow_runs`, ``prefect.keep_runs`` in
params.yaml), and the SQLite write-ahead log is checkpointed and truncated when it stops.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import prefect
import prefect.context
import prefect.settings
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings

from mirrorinf import procs

__all__ = [
    "PrefectAPI",
    "abandon_prefect_queues",
    "api_is_temporary",
    "drain_prefect_workers",
    "prefect_api",
    "prune_flow_runs",
]

logger = logging.getLogger(__name__)

LOG_NAME = "api-server.log"
DB_NAME = "prefect.db"  # Prefect's default SQLite store in PREFECT_HOME
STALE_AFTER = timedelta(days=1)  # a run not finished after this long: its process was killed
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


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
            # events fill the store run after run and nothing reads them from this server
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
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
        truncate_wal(Path(PREFECT_HOME.value()) / DB_NAME)


def truncate_wal(db: Path) -> None:
    """Fold SQLite's write-ahead log into the database and truncate it (a stopped server leaves
    it at its largest); busy (another command's server has it open) = left for the next stop."""
    if not db.is_file():
        return
    try:
        with closing(sqlite3.connect(db, timeout=1)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as err:
        logger.debug("%s: WAL not truncated: %s", db, err)


def api_is_temporary() -> bool:
    """Whether the Prefect API in use is a temporary server of this process (mirrorinf's own,
    Prefect's or a test harness's) rather than a configured one, whose history is its owner's
    (Prefect's ``db_vacuum`` service)."""
    url = PREFECT_API_URL.value()
    if not url:
        return True  # Prefect starts a temporary server in this process
    servers = list(SubprocessASGIServer._instances.values())
    return any(server.api_url == url for server in servers)


def prune_flow_runs(flow_name: str, keep: int) -> int:
    """Delete all runs of ``flow_name`` but the newest ``keep`` (their task runs and states go
    with them, their logs right after, server-side); returns how many. A run not in a final
    state is kept (it may be running in another process) unless it is stale."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    stale = datetime.now(timezone.utc) - STALE_AFTER
    deleted, offset = 0, keep
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                offset=offset,
                limit=100,
            )
            if not runs:
                return deleted
            for run in runs:
                final = run.state_type is not None and run.state_type.value in FINAL_STATES
                updated = run.updated or run.created
                if final or (updated is not None and updated < stale):
                    client.delete_flow_run(run.id)
                    deleted += 1
                else:
                    offset += 1


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


def abandon_prefect_queues() -> int:
    """Drop the logs and events still queued for a Prefect API that stopped answering, and
    return how many: at exit Prefect would retry each one against the dead server (about 7 s an
    item) and print each failure after the CLI's one-line error."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    dropped = 0
    for worker in (APILogWorker, EventsWorker):
        for service in list(getattr(worker, "_instances", {}).values()):
            pending = getattr(service, "_queue", None)
            while pending is not None:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                pending.task_done()
                if item is None:  # the stop signal: put it back so that the service still ends
                    pending.put_nowait(None)
                    break
                dropped += 1
    return dropped


@contextmanager
def prefect_api(
    timeout: int | None = None, *, while_starting: AbstractContextManager[Any] | None = None
) -> Iterator[str]:
    """The Prefect API URL for this block: the configured one (PREFECT_API_URL, a profile, a test
    harness), else a temporary server that lives as long as the block and dies with the process.

    ``while_starting`` is entered around the temporary server's start-up only (seconds spent
    waiting on another process: work to overlap with them). Call it from the thread that runs
    the block (Linux signals the server when that thread ends).
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = PrefectAPI()
    with ExitStack() as stack:
        stack.callback(server.stop)
        with while_starting or nullcontext():
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
