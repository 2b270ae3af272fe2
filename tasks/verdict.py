"""The verdict record of a model version, the gate that reads it, and runs that died (MLflow).

**One record per version.** :func:`tag_model_version` writes the model-version tag
``mirrorinf.verdict``: compact JSON naming the gate, the influence run (id, experiment, start
time), the report (``runs:/<id>/report.md``), the model name and version, the config fingerprint,
the md5 of the training data, the mirrorinf version and the record's schema. It is one
``set_model_version_tag`` call, so any MLflow client (Python, REST, another machine) reads a whole
record with one ``get_model_version`` and never half of one. The record is derived from the run
itself (its tags and start time), and only from a run that is already FINISHED: a run logs every
artifact and its own verdict (run tag ``mirrorinf.gate``), ends FINISHED, and only then publishes.

**Publishing order** (under the model's lock, see ``tracking.store_lock``): the run that started
last *among FINISHED runs* wins; a run that loses is tagged ``mirrorinf.superseded_by``. The
winner writes ``mirrorinf.validation_status=pending``; on a fail it removes the pass alias from
this version; then the convenience tags (``mirrorinf.gate``, ``mirrorinf.run_id``,
``mirrorinf.report``, the description); then the record (the commit point); then
``mirrorinf.validation_status`` = passed|failed and, on a pass, the alias. Whatever grants a
release (the alias, a passed status) comes after the record; whatever revokes one comes before,
so a kill at any point leaves at worst ``pending``, never a pass that the record does not hold.

**The gate** (:func:`gate_status`) reads only the record and the run it names, with plain
``MlflowClient`` calls (no lock: it works against a remote server), and accepts the record only
if that run exists, is FINISHED and yields the same record; otherwise it says why.

**Runs that died.** Each influence run is tagged at creation with its owner (host, boot id, pid,
process start time: a reused pid is not mistaken for the owner). :func:`reap_dead_runs`, called
when a run starts, marks FAILED the RUNNING runs of the experiment owned by this host whose owner
process is gone, tagging why. Runs owned by another host are left alone: their liveness cannot be
checked from here (a run that died there stays RUNNING until a run on that host starts; the gate
still never accepts it, since it is not FINISHED).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf.errors import ModelError
from mirrorinf.tasks.data import retry_unless_input_error
from mirrorinf.tasks.tracking import (
    GATE_TAG,
    REPORT_TAG,
    RUN_TAG,
    SUPERSEDED_TAG,
    TAG_LOCK_TIMEOUT_S,
    _retry_locked,
    get_client,
    store_lock,
)

__all__ = [
    "STATUS_TAG",
    "VERDICT_TAG",
    "GateStatus",
    "gate_status",
    "owner_alive",
    "owner_tags",
    "reap_dead_runs",
    "tag_model_version",
    "tag_model_version_task",
    "verdict_record",
]

logger = logging.getLogger(__name__)

VERDICT_TAG = "mirrorinf.verdict"  # the record: the one tag a reader must trust
STATUS_TAG = "mirrorinf.validation_status"  # pending | passed | failed, for release jobs
VERDICT_SCHEMA = 1
OWNER_HOST, OWNER_BOOT = "mirrorinf.owner.host", "mirrorinf.owner.boot"
OWNER_PID, OWNER_START = "mirrorinf.owner.pid", "mirrorinf.owner.start"
REAPED_TAG = "mirrorinf.reaped_by"  # on a run marked FAILED because its owner process is gone
_DESCRIPTION_MARK = "Influence gate "  # how a description written here starts


# --------------------------------------------------------------------------- owners


def _boot_id() -> str:
    """This machine's boot id (Linux), so pids from before a reboot are never taken as alive."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot on Linux); None when it is gone or a
    zombie (killed, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: psutil if installed, else existence only
        try:
            import psutil
        except ImportError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return ""
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return f"{proc.create_time():.2f}"
        except psutil.Error:
            return None
    fields = stat[stat.rfind(")") + 2 :].split()  # fields 3.. (the name may hold spaces)
    return None if fields[0] in ("Z", "X") else fields[19]  # state, starttime (field 22)


def owner_tags() -> dict[str, str]:
    """Run tags naming this process as the run's owner: host, boot id, pid, start time."""
    pid = os.getpid()
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_BOOT: _boot_id(),
        OWNER_PID: str(pid),
        OWNER_START: _process_start(pid) or "",
    }


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process owning a run (its owner tags) still runs; None when that cannot be
    told from here (another host, or a run without owner tags)."""
    if tags.get(OWNER_HOST) != socket.gethostname() or not tags.get(OWNER_PID, "").isdigit():
        return None
    if tags.get(OWNER_BOOT) and tags[OWNER_BOOT] != _boot_id():
        return False  # the machine rebooted since
    start = _process_start(int(tags[OWNER_PID]))
    return start is not None and (not tags.get(OWNER_START) or start == tags[OWNER_START])


def _owner_text(tags: dict[str, str]) -> str:
    return f"pid {tags.get(OWNER_PID, '?')} on {tags.get(OWNER_HOST, '?')}"


def reap_dead_runs(client: Any, experiment_id: str, by: str = "") -> list[str]:
    """Mark FAILED the RUNNING runs of an experiment owned by a gone process on this host.

    Each gets ``mirrorinf.error`` (why) and ``mirrorinf.reaped_by`` (``by``: who noticed).
    Runs owned by another host, or without owner tags, are left alone (see the module
    docstring). Returns the ids marked.
    """
    host = socket.gethostname().replace("'", "")
    found = _retry_locked(
        client.search_runs,
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'",
        max_results=1000,
    )
    reaped = []
    for run in found:
        tags = run.data.tags
        if owner_alive(tags) is not False:
            continue
        why = f"the owner process ({_owner_text(tags)}) is gone: killed or crashed mid-run"
        _retry_locked(client.set_tag, run.info.run_id, "mirrorinf.error", why)
        _retry_locked(client.set_tag, run.info.run_id, REAPED_TAG, by or "mirrorinf")
        _retry_locked(client.set_terminated, run.info.run_id, status="FAILED")
        logger.warning("marked run %s FAILED: %s", run.info.run_id, why)
        reaped.append(run.info.run_id)
    return reaped


# --------------------------------------------------------------------------- the record


def verdict_record(run: Any) -> dict[str, Any]:
    """The verdict record of a run (an MLflow ``Run``), derived from its own tags only."""
    tags = run.data.tags
    return {
        "schema": VERDICT_SCHEMA,
        "gate": tags.get(GATE_TAG),
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "run_start": run.info.start_time,
        "report": f"runs:/{run.info.run_id}/report.md",
        "model": tags.get("mirrorinf.model.name"),
        "version": tags.get("mirrorinf.model.version"),
        "config_fingerprint": tags.get("mirrorinf.config_fingerprint"),
        "train_md5": tags.get("mirrorinf.data.train.md5"),
        "mirrorinf": tags.get("mirrorinf.version"),
    }


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _get_run(client: Any, run_id: str) -> Any | None:
    """The run, or None when it does not exist (deleted, or another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return _retry_locked(client.get_run, run_id)
    except MlflowException:
        return None


def _check(client: Any, record: dict[str, Any], name: str, version: str) -> tuple[Any, str]:
    """(the run, "") when ``record`` is a valid verdict of ``name`` v``version``, else (run or
    None, why not: one sentence ending in what to do)."""
    rerun = "rerun mirrorinf run for this version"
    if record.get("schema") != VERDICT_SCHEMA:
        return None, f"verdict record schema {record.get('schema')!r} is not {VERDICT_SCHEMA}"
    if (record.get("model"), record.get("version")) != (name, version):
        return None, f"the verdict record names {record.get('model')} v{record.get('version')}"
    run_id = str(record.get("run_id"))
    run = _get_run(client, run_id)
    if run is None:
        return None, f"the influence run {run_id} of the verdict record does not exist; {rerun}"
    status = run.info.status
    if status == "RUNNING":
        alive = owner_alive(run.data.tags)
        owner = _owner_text(run.data.tags)
        state = {False: f"its owner process ({owner}) is gone", True: f"{owner} is running"}
        how = state.get(alive, f"owned by {owner}")
        return run, f"the influence run {run_id} did not finish (RUNNING; {how}); {rerun}"
    if status != "FINISHED":
        return run, f"the influence run {run_id} did not finish ({status}); {rerun}"
    derived = verdict_record(run)
    wrong = sorted(k for k in derived.keys() | record.keys() if derived.get(k) != record.get(k))
    if wrong:
        diff = ", ".join(f"{k}: record {record.get(k)!r}, run {derived.get(k)!r}" for k in wrong)
        why = f"the verdict record does not match its influence run {run_id} ({diff})"
        return run, f"{why}; {rerun}"
    if record["gate"] not in ("passed", "failed"):
        return run, f"the influence run {run_id} logged no verdict; {rerun}"
    return run, ""


# --------------------------------------------------------------------------- publish


def _winner(client: Any, current: str | None, mine: Any, name: str, version: str) -> str | None:
    """The run id of a valid recorded verdict that started after run ``mine``, else None."""
    if not current:
        return None
    try:
        record = json.loads(current)
    except ValueError:
        return None
    theirs, why = _check(client, record, name, version)
    if why or theirs.info.run_id == mine.info.run_id:
        return None
    later = (theirs.info.start_time or 0, theirs.info.run_id) > (
        mine.info.start_time or 0,
        mine.info.run_id,
    )
    return theirs.info.run_id if later else None


def _recorded_run(tags: dict[str, str]) -> str | None:
    """The run id a version's record names (else its ``mirrorinf.run_id`` tag), if any."""
    with suppress(KeyError, TypeError, ValueError):
        return str(json.loads(tags[VERDICT_TAG])["run_id"])
    return tags.get(RUN_TAG)


def _publish(
    client: Any, name: str, version: str, verdict: str, run_id: str, alias: str | None
) -> bool:
    """The body of :func:`tag_model_version`, run under the model's tag lock."""
    from mlflow.exceptions import MlflowException

    run = _get_run(client, run_id)
    if run is None or run.info.status != "FINISHED":
        state = "missing" if run is None else run.info.status
        raise RuntimeError(f"run {run_id} is {state}: only a FINISHED run publishes a verdict")
    record = verdict_record(run)
    if (record["gate"], record["model"], record["version"]) != (verdict, name, version):
        logged = f"{record['gate']} for {record['model']} v{record['version']}"
        raise RuntimeError(f"run {run_id} logged {logged}, not {verdict} for {name} v{version}")
    mv = client.get_model_version(name, version)
    tags = mv.tags or {}
    winner = _winner(client, tags.get(VERDICT_TAG), run, name, version)
    if winner:
        client.set_tag(run_id, SUPERSEDED_TAG, winner)
        logger.warning(
            "%s v%s keeps the verdict of run %s, which started after this run %s",
            name, version, winner, run_id,
        )  # fmt: skip
        return False
    set_tag = client.set_model_version_tag
    set_tag(name, version, STATUS_TAG, "pending")  # revoke first: a kill from here is visible
    if alias and verdict != "passed":
        aliases = client.get_registered_model(name).aliases or {}
        if str(aliases.get(alias)) == version:
            client.delete_registered_model_alias(name, alias)
            logger.info("removed alias %s from %s v%s (gate failed)", alias, name, version)
    link = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    set_tag(name, version, GATE_TAG, verdict)
    set_tag(name, version, RUN_TAG, run_id)
    set_tag(name, version, REPORT_TAG, link)
    description = mv.description or ""
    if not description.strip() or description.startswith(_DESCRIPTION_MARK):
        text = (
            f"{_DESCRIPTION_MARK}**{verdict.upper()}**: "
            f"[influence run {run_id}]({link}); its `report.md` says why, `plots/` shows it."
        )
        client.update_model_version(name, version, description=text)
    set_tag(name, version, VERDICT_TAG, _dump(record))  # the commit point
    set_tag(name, version, STATUS_TAG, verdict)
    if alias and verdict == "passed":  # grants only after the record
        client.set_registered_model_alias(name, alias, version)
    previous = _recorded_run(tags)
    if previous and previous != run_id:
        with suppress(MlflowException):  # the displaced run may have been deleted
            client.set_tag(previous, SUPERSEDED_TAG, run_id)
    return True


def tag_model_version(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    verdict: str,
    run_id: str,
    alias_on_pass: str | None,
) -> bool:
    """Publish a FINISHED run's verdict on its model version (see the module docstring).

    Under the model's inter-process lock: if the version's record names a valid verdict of a run
    that started after this one, nothing is written and this run is tagged
    ``mirrorinf.superseded_by``; otherwise the convenience tags, the record and the alias are
    written in the order that keeps every reader safe. Returns True when this verdict stands.

    Raises:
        RuntimeError: the run is not FINISHED or logged another verdict / model version.
    """
    client = get_client(tracking_uri)
    with store_lock(tracking_uri, f"tags-{name}", timeout=TAG_LOCK_TIMEOUT_S):
        return _retry_locked(_publish, client, name, str(version), verdict, run_id, alias_on_pass)


class GateStatus(NamedTuple):
    """What ``mirrorinf gate`` reports: verdict (None: no valid record), its run and why."""

    verdict: str | None
    run_id: str | None
    reason: str


def gate_status(tracking_uri: str, name: str, version: str) -> GateStatus:
    """The verdict of a model version, from its record only, checked against the run it names.

    Plain ``MlflowClient`` reads (no lock, works against a server); a record whose run is
    missing, not FINISHED (a RUNNING run is reported dead or alive, never marked) or logged
    something else yields verdict None and the reason.

    Raises:
        ModelError: the registered model or version does not exist.
    """
    from mlflow.exceptions import MlflowException

    version = str(version)
    client = get_client(tracking_uri)
    try:
        mv = _retry_locked(client.get_model_version, name, version)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ModelError(f"no model version {name!r} v{version} in {tracking_uri}") from None
        raise
    tags = mv.tags or {}
    raw = tags.get(VERDICT_TAG)
    if raw is None:
        why = "no influence result; run mirrorinf run for this version"
        if GATE_TAG in tags:
            why = (
                f"no verdict record (tag {VERDICT_TAG}), only tags from an interrupted run or an "
                "older mirrorinf; rerun mirrorinf run for this version"
            )
        return GateStatus(None, tags.get(RUN_TAG), why)
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except ValueError:
        return GateStatus(None, None, f"the verdict record is not a JSON object: {raw[:80]!r}")
    run, why = _check(client, record, name, version)
    run_id = run.info.run_id if run is not None else record.get("run_id")
    if why:
        return GateStatus(None, run_id, why)
    return GateStatus(record["gate"], run_id, f"influence run {run_id}")


tag_model_version_task = task(
    tag_model_version,
    name="tag-model-version",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
