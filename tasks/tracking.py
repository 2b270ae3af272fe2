"""MLflow tracking for influence runs and model-version gate tags (one tool: MLflow).

Uses ``MlflowClient`` with explicit run ids (no fluent "active run" state), so it is safe in
Prefect's worker threads and a failure can always mark the right run FAILED. Conventions (kept
stable for reviewers and the release gate):

- the influence run carries tags ``mirrorinf.model.{name,version,run_id}``,
  ``mirrorinf.data.<set>.{source,path,repo,rev,commit,md5}``, ``mirrorinf.code_version``,
  ``mirrorinf.config_fingerprint``, ``mirrorinf.owner.*``, ``mirrorinf.gate`` (the run's own
  verdict, set once its artifacts are logged); the params flattened as run params;
  the engine config as ``config.json``; artifacts ``scores/*.npy``, ``tables/*.parquet``,
  ``checks/gx_result.json``, ``summary.json``; the review (:func:`log_review`): ``report.md``,
  ``checks/gx_result.md``, ``plots/*.png`` and UI tables ``tables/*.json``;
- the model version gets its verdict record ``mirrorinf.verdict`` and tags derived from it
  (``mirrorinf.gate``, ``mirrorinf.run_id``, ``mirrorinf.report``, ``mirrorinf.validation_status``,
  a description, the pass alias): written by ``mirrorinf.tasks.verdict`` once the run is
  FINISHED, read back by the gate from the record alone.

Each influence run is tagged with its owner process (``mirrorinf.owner.*``); a run starting
first marks FAILED the runs of its experiment whose owner on this host died (see
``mirrorinf.tasks.verdict``). Locks are files next to a SQLite / file store
(``.mirrorinf-locks/``, flock: released by the kernel if a process dies); for a remote store they
live in the temp folder and so only serialise runs on one machine. SQLite "database is locked"
errors are retried, and a new SQLite store is created under a lock (MLflow's schema creation
fails when two processes do it at once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf.io import write_parquet
from mirrorinf.params import has_uri_scheme
from mirrorinf.tasks.data import retry_unless_input_error

__all__ = [
    "SUPERSEDED_TAG",
    "code_version",
    "ensure_experiment",
    "flatten",
    "get_client",
    "influence_run",
    "lock_dir",
    "log_influence",
    "log_influence_task",
    "log_review",
    "log_review_task",
    "store_lock",
]

logger = logging.getLogger(__name__)

GATE_TAG = "mirrorinf.gate"
RUN_TAG = "mirrorinf.run_id"
REPORT_TAG = "mirrorinf.report"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow's dataset-input contexts (the UI's lineage column); the query set is what is explained
DATASET_CONTEXTS = {"train": "training", "val": "validation", "query": "query"}
SUPERSEDED_TAG = "mirrorinf.superseded_by"  # on a run whose verdict another run replaced
TAG_LOCK_TIMEOUT_S = 300.0  # tagging holds the lock for well under a second

_clients: dict[str, Any] = {}
_started: list[tuple[str, str]] = []  # (tracking URI, run id) of this process's influence runs
_lock = threading.Lock()
T = TypeVar("T")


def _local_store_dir(tracking_uri: str) -> Path | None:
    """The folder of a local store (SQLite file or file store); None for remote / in-memory."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        return Path(db).parent if db and db != ":memory:" else None
    if tracking_uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(tracking_uri).path)
    if "://" not in tracking_uri and not tracking_uri.startswith("databricks"):
        return Path(tracking_uri)
    return None


def lock_dir(tracking_uri: str) -> Path:
    """Where the inter-process locks of a store live (created): beside a local store, else in the
    temp folder under a hash of the URI (then they only serialise runs on one machine)."""
    local = _local_store_dir(tracking_uri)
    candidates = [local / ".mirrorinf-locks"] if local is not None else []
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    candidates.append(Path(tempfile.gettempdir()) / "mirrorinf-locks" / digest)
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:  # e.g. a read-only store folder
            continue
    raise OSError(f"cannot create a lock folder for {tracking_uri}")


@contextmanager
def store_lock(tracking_uri: str, key: str, timeout: float = -1) -> Iterator[None]:
    """Hold the inter-process lock ``key`` of a store (flock on a file; -1 waits forever).

    The kernel releases a lock whose process dies, so a crash never leaves one behind. Each
    call takes its own lock object: do not nest two calls with the same key in one thread.

    Raises:
        TimeoutError: not acquired within ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80]
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    lock = FileLock(str(lock_dir(tracking_uri) / f"{safe}-{digest}.lock"), timeout=timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another run holding %s (%s)", key, tracking_uri)
        try:
            lock.acquire()
        except Timeout:
            msg = f"lock {key!r} of {tracking_uri} not acquired in {timeout} s"
            raise TimeoutError(msg) from None
    try:
        yield
    finally:
        lock.release()


def _retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with backoff while SQLite says "database is locked"."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            delay = min(0.1 * 2**attempt, 5.0) * (1 + random.random())
            logger.info("MLflow store busy (database is locked); retrying in %.1f s", delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def get_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (one per URI; a SQLite file's folder is created).

    A SQLite store is opened (created, migrated) under the store's ``init`` lock: MLflow's
    schema creation fails ("table ... already exists") when two processes run it at once.
    """
    from mlflow import MlflowClient

    with _lock:
        if tracking_uri not in _clients:
            if not tracking_uri.startswith("sqlite:"):
                _clients[tracking_uri] = MlflowClient(tracking_uri=tracking_uri)
                return _clients[tracking_uri]
            if tracking_uri.startswith("sqlite:///"):
                Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            with store_lock(tracking_uri, "init"):
                client = MlflowClient(tracking_uri=tracking_uri)
                client.search_registered_models(max_results=1)  # opens the registry store too
            _clients[tracking_uri] = client
        return _clients[tracking_uri]


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """Id of experiment ``name``, created with ``artifact_location`` when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_location and not has_uri_scheme(artifact_location):
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
    try:
        # the classic model-development view (MLflow 3 otherwise lists runs as GenAI evaluations)
        tags = {EXPERIMENT_KIND_TAG: "custom_model_development"}
        return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def code_version(root: str | Path) -> str | None:
    """Git commit of ``root`` (``-dirty`` when the tree has changes); None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b": "value"} with values as short strings (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = json.dumps(data) if not isinstance(data, str) else data
        out[prefix.rstrip(".")] = text[:6000]
    return out


@contextmanager
def mlflow_run(
    client: Any, experiment_id: str, *, run_name: str, tags: dict[str, str]
) -> Iterator[str]:
    """Create a run and yield its id; FINISHED on exit, FAILED on any exception (re-raised).

    A run is never left RUNNING by an error in the body, including KeyboardInterrupt.
    """
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException as err:
        try:
            client.set_tag(run_id, "mirrorinf.error", f"{type(err).__name__}: {err}"[:5000])
        finally:
            _retry_locked(client.set_terminated, run_id, status="FAILED")
        raise
    _retry_locked(client.set_terminated, run_id, status="FINISHED")


def provenance_tags(datasets: dict[str, Any]) -> dict[str, str]:
    """Tags ``mirrorinf.data.<set>.<field>`` from {set name: Provenance or dict}."""
    tags = {}
    for name, prov in datasets.items():
        items = prov.to_dict() if hasattr(prov, "to_dict") else dict(prov)
        for key, value in items.items():
            if key == "classes" and value is not None:  # many classes: keep under tag limits
                text = ",".join(map(str, value))
                value = text if len(text) <= 1000 else f"{text[:1000]}... ({len(value)} classes)"
            if value is not None:
                tags[f"mirrorinf.data.{name}.{key}"] = str(value)
    return tags


@contextmanager
def influence_run(
    tracking_uri: str,
    experiment: str,
    artifact_location: str | None,
    *,
    model: Any,
    datasets: dict[str, Any],
    params: dict[str, Any],
    config: dict[str, Any],
    config_fingerprint: str,
    code: str | None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start the influence run for a model version (tags, params, config) and yield its id.

    Marked FINISHED when the block ends, FAILED on any exception (see :func:`mlflow_run`).
    First, runs of the experiment left RUNNING by a dead process on this host are marked FAILED;
    the new run is tagged with its owner (this process) for the same check later.
    """
    from mlflow.entities import Param

    import mirrorinf
    from mirrorinf.tasks.verdict import owner_tags, reap_dead_runs  # verdict imports this module

    client = get_client(tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_location)
    reap_dead_runs(client, exp_id, by=f"an influence run of {model.name} v{model.version}")
    tags = {
        "mirrorinf.kind": "influence",
        "mirrorinf.model.name": model.name,
        "mirrorinf.model.version": str(model.version),
        "mirrorinf.model.uri": model.uri,
        "mirrorinf.config_fingerprint": config_fingerprint,
        "mirrorinf.version": getattr(mirrorinf, "__version__", "unknown"),
        **provenance_tags(datasets),
        **owner_tags(),
        **(extra_tags or {}),
    }
    if model.run_id:
        tags["mirrorinf.model.run_id"] = model.run_id
    if code:
        tags["mirrorinf.code_version"] = code
    name = f"influence-{model.name}-v{model.version}"
    with mlflow_run(client, exp_id, run_name=name, tags=tags) as run_id:
        flat = [Param(k, v) for k, v in sorted(flatten(params).items())]
        for i in range(0, len(flat), 100):
            client.log_batch(run_id, params=flat[i : i + 100])
        client.log_dict(run_id, config, "config.json")
        client.log_dict(run_id, params, "params.json")
        client.log_inputs(run_id, datasets=dataset_inputs(datasets))
        _started.append((tracking_uri, run_id))
        yield run_id


def started_runs() -> list[tuple[str, str]]:
    """(tracking URI, run id) of the influence runs this process started, oldest first: the CLI
    says what they recorded when the Prefect API dies after them."""
    return list(_started)


def dataset_inputs(datasets: dict[str, Any]) -> list[Any]:
    """MLflow dataset inputs (name, digest, source) for lineage the UI shows natively: the
    training, validation and query sets with their md5 and where the bytes came from."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    out = []
    for name, prov in datasets.items():
        p = prov if isinstance(prov, dict) else prov.to_dict()
        source = {"path": p["path"]}
        if p.get("source") == "dvc":
            source.update(repo=p.get("repo"), rev=p.get("rev"), commit=p.get("commit"))
        dataset = Dataset(
            name=f"{name}:{Path(str(p['path'])).name}",
            digest=str(p["md5"])[:36],
            source_type="dvc" if p.get("source") == "dvc" else "local",
            source=json.dumps(source, sort_keys=True),
        )
        context = DATASET_CONTEXTS.get(name, name)
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return out


def _row_shape(split: Any) -> tuple[int, ...] | None:
    """One example's input shape (None for named inputs), from its first row only."""
    first = split.read(0, 1)
    return None if isinstance(first, dict) else tuple(first.shape[1:])


def _texts(train: Any, queries: Any, predicted: Any, kind: str, tokenizer: Any) -> dict:
    """Token inputs as text for the review (ReviewInputs train_text / query_text / pred_text),
    decoded only for the rows the review shows; empty when the inputs are not token ids."""
    from mirrorinf.tasks.hf_model import RowTexts, token_ids

    if token_ids(train.read(0, 1)) is None or token_ids(queries.read(0, 1)) is None:
        return {}

    def tokens_of(split: Any) -> RowTexts:
        return RowTexts(lambda idx: token_ids(split.gather(idx)), len(split), tokenizer)

    out = {"train_text": tokens_of(train), "query_text": tokens_of(queries)}
    pred = None if predicted is None else np.asarray(predicted)
    if kind == "sequence" and pred is not None and pred.shape == tuple(train.y.shape):
        scored = train.y.numpy() != -100  # the positions with a label
        out["pred_text"] = RowTexts(lambda idx: (pred[idx], scored[idx]), len(pred), tokenizer)
    return out


def _finite_metrics(metrics: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
            out.append(Metric(key, float(value), now, 0))
    return out


def place_array(value: Any, path: Path) -> None:
    """Put an array at ``path`` as .npy without holding a copy: a memory map of a whole .npy
    file is hard-linked (same file system) or copied as a file; anything else is saved."""
    source = getattr(value, "filename", None)
    if (
        isinstance(value, np.memmap)
        and source
        and (value.offset, value.shape) == _npy_layout(source)
    ):
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        return
    np.save(path, value)


def _npy_layout(path: str) -> tuple[int, tuple[int, ...]]:
    """(where the data starts, shape) of an .npy file: a map of all of it has both."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)  # fmt: skip
        shape = reader(fh)[0]
        return fh.tell(), tuple(shape)


def log_stage_seconds(tracking_uri: str, run_id: str, seconds: dict[str, float]) -> None:
    """Log the flow's wall time per stage as run metrics ``stage_seconds.<stage>``."""
    metrics = _finite_metrics({f"stage_seconds.{k}": v for k, v in seconds.items()})
    get_client(tracking_uri).log_batch(run_id, metrics=metrics)


def log_influence(
    tracking_uri: str,
    run_id: str,
    *,
    scores: Any,
    tables: Any,
    check: Any,
    metrics: dict[str, Any],
    summary: dict[str, Any],
    verdict: str,
) -> None:
    """Log metrics, the score arrays (.npy), tables (.parquet), GX result (.json) and summary.

    The score matrices are logged as files (``scores/pairwise.npy``, float32 [n_train, n_query],
    rows in training-file order; ``scores/leak_pairwise.npy`` in a non-plain mode), hard-linked
    or copied from the store's verified file, never loaded; the per-query top-k proponents and
    opponents are ``tables/queries.parquet`` (``gate.top_k`` each, default min(10, n_train))."""
    client = get_client(tracking_uri)
    batch = _finite_metrics(metrics)
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])
    with tempfile.TemporaryDirectory(prefix="mirrorinf-log-") as tmp:
        d = Path(tmp)
        (d / "scores").mkdir()
        place_array(scores.pairwise, d / "scores" / "pairwise.npy")
        if scores.leak_pairwise is not None:
            place_array(scores.leak_pairwise, d / "scores" / "leak_pairwise.npy")
        np.save(d / "scores" / "self_influence.npy", scores.self_influence)
        np.save(d / "scores" / "group_influence.npy", scores.group_influence)
        if scores.loss_after_fit is not None:  # the harmful flag's score
            np.save(d / "scores" / "loss_after_fit.npy", scores.loss_after_fit)
        np.save(d / "scores" / "query_self_drop.npy", scores.query_self_drop)
        (d / "scores" / "reports.json").write_text(json.dumps(scores.reports, indent=2))
        (d / "tables").mkdir()
        for name in ("train", "queries", "leaks"):  # row group by row group: no Arrow copy
            write_parquet(getattr(tables, name), d / "tables" / f"{name}.parquet")
        (d / "checks").mkdir()
        (d / "checks" / "gx_result.json").write_text(check.as_json())
        (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifacts(run_id, str(d))
    client.set_tag(run_id, GATE_TAG, verdict)


def log_review(
    tracking_uri: str,
    run_id: str,
    *,
    tables: Any,
    check: Any,
    train: Any,
    queries: Any,
    predicted: Any,
    verdict: str,
    reasons: list[str],
    model: Any = None,
    kind: str = "classification",
    tokenizer: Any = None,
    image_norm: tuple[Any, Any] | None = None,
) -> list[str]:
    """Log the review (``mirrorinf.report``): plots, report.md, GX markdown and UI tables.

    ``train`` / ``queries`` are the scored datasets (``tasks.data.Dataset``), ``predicted`` the
    model's labels of the training examples; ``model`` (a ``ModelRef``) names the version in the
    report's title; ``tokenizer`` (the model's, if it has one) decodes token inputs and
    predicted tokens for the review (else token ids are shown); ``image_norm`` the (mean, std)
    image inputs were normalised with (``data.image``), undone for display. The version's tags
    (``mirrorinf.report`` and the rest) are written by ``mirrorinf.tasks.verdict`` once the run
    is FINISHED. Returns the artifact paths logged.
    """
    from mirrorinf.review import TABLES, ReviewInputs, review_tables, write_report
    from mirrorinf.summary import target_labels

    review = ReviewInputs(
        tables=tables,
        train_x=train.flat_rows(),
        query_x=queries.flat_rows(),
        query_ids=np.asarray(queries.ids),
        query_labels=target_labels(queries.y),
        train_pred=None if predicted is None else np.asarray(predicted),
        checks=list(check.results),
        verdict=verdict,
        reasons=list(reasons),
        kind=kind,
        x_shape=_row_shape(train),
        class_names=getattr(train, "classes", None),
        image_norm=image_norm,
        title="Influence review"
        + (f": {model.name} v{model.version}" if model is not None else ""),
        **_texts(train, queries, predicted, kind, tokenizer),
    )
    client = get_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="mirrorinf-review-") as tmp:
        files = write_report(tmp, review)
        client.log_artifacts(run_id, tmp)
    logged = {a.path for a in client.list_artifacts(run_id, "tables")}
    for key, frame in review_tables(review).items():
        if TABLES[key] not in logged:  # log_table appends: a retried task must not double rows
            client.log_table(run_id, data=frame, artifact_file=TABLES[key])
        files.append(TABLES[key])
    return sorted(files)


log_influence_task = task(
    log_influence,
    name="log-influence",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
log_review_task = task(
    log_review,
    name="log-review",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
