"""Score new model versions without a line in the training script: watch the MLflow registry.

``mirrorinf watch --model NAME [--model NAME2 ...]`` polls the registry API (any MLflow server or
store) and runs the influence flow for every version of those models that has no verdict yet.
The version's own tags are the state: a version with a ``mirrorinf.gate`` tag is done, so a
restarted watcher resumes where it stopped and never scores a version twice; a version whose
runs failed ``max_attempts`` times (tag ``mirrorinf.watch.attempts``) is left alone until a
person removes that tag.

Each model brings its own data: the params file named by the tag ``mirrorinf.params`` on the
version or, failing that, on the registered model (a path, relative to the watcher's params
folder) is used for that model; otherwise the watcher's params. Two models on one server are so
each scored on the data they were trained on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mirrorinf.errors import InputError
from mirrorinf.flows.trigger import pinned_params
from mirrorinf.params import Params, load_params
from mirrorinf.tasks.tracking import GATE_TAG, get_client

__all__ = ["PARAMS_TAG", "WatchReport", "pending_versions", "watch", "watch_once"]

logger = logging.getLogger(__name__)

PARAMS_TAG = "mirrorinf.params"  # per model (or version): the params file of its data
ATTEMPTS_TAG = "mirrorinf.watch.attempts"


@dataclass
class WatchReport:
    """What one pass over the registry did: versions scored, failed, and their verdicts."""

    scored: dict[str, str] = field(default_factory=dict)  # "name/version" -> verdict
    failed: dict[str, str] = field(default_factory=dict)  # "name/version" -> error


def pending_versions(client: Any, name: str, max_attempts: int) -> list[Any]:
    """Versions of ``name`` without a verdict and under the attempt limit, oldest first."""
    versions = client.search_model_versions(f"name = '{_quoted(name)}'")
    todo = [
        mv
        for mv in versions
        if GATE_TAG not in mv.tags and int(mv.tags.get(ATTEMPTS_TAG, "0")) < max_attempts
    ]
    return sorted(todo, key=lambda mv: int(mv.version))


def _quoted(name: str) -> str:
    if "'" in name:
        raise InputError(f"model name {name!r} contains a quote; rename the registered model")
    return name


def _params_for(client: Any, mv: Any, base: Params) -> Params:
    """The watcher's params, or the params file the version / its model names in PARAMS_TAG."""
    path = mv.tags.get(PARAMS_TAG) or client.get_registered_model(mv.name).tags.get(PARAMS_TAG)
    if not path:
        return base
    resolved = base.resolve(path)
    if not resolved.is_file():
        raise InputError(f"{mv.name} v{mv.version}: {PARAMS_TAG} names {path}, which is not a file")
    params = load_params(resolved)
    # one store: the watcher's (a model's params file may name another by mistake)
    return params.replace(mlflow=base.mlflow.model_dump())


def watch_once(
    params: Params,
    models: Sequence[str],
    *,
    max_attempts: int = 3,
    run: Callable[[Params], Any] | None = None,
) -> WatchReport:
    """One pass: score every pending version of ``models``; failures are counted on the version."""
    if run is None:
        from mirrorinf.flows.influence import run_influence as run
    client = get_client(params.tracking_uri())
    report = WatchReport()
    for name in models:
        for mv in pending_versions(client, name, max_attempts):
            key = f"{name}/{mv.version}"
            try:
                pinned = pinned_params(name, mv.version, _params_for(client, mv, params))
                result = run(pinned)
            except Exception as err:  # one bad version must not stop the watcher
                attempts = int(mv.tags.get(ATTEMPTS_TAG, "0")) + 1
                client.set_model_version_tag(name, mv.version, ATTEMPTS_TAG, str(attempts))
                report.failed[key] = str(err).splitlines()[0] if str(err) else type(err).__name__
                logger.warning("watch: %s failed (attempt %d): %s", key, attempts, err)
                continue
            report.scored[key] = result.verdict
            logger.warning("watch: %s gate %s (run %s)", key, result.verdict, result.run_id)
    return report


def watch(
    params: Params,
    models: Sequence[str],
    *,
    interval: float = 30.0,
    once: bool = False,
    max_attempts: int = 3,
) -> WatchReport:
    """Poll every ``interval`` seconds until interrupted (or one pass with ``once``)."""
    if not models:
        raise InputError("watch needs at least one --model NAME to watch")
    total = WatchReport()
    while True:
        report = watch_once(params, models, max_attempts=max_attempts)
        total.scored.update(report.scored)
        total.failed.update(report.failed)
        if once:
            return total
        time.sleep(interval)
