"""Score with the engine, then summarise and validate (the engine + the GX checks).

``compute_scores`` runs the three Forward-INF views a review needs: pairwise influence of every
training example on each query, group influence on the validation set (negative = hurts
held-out performance) and self-influence of every training example. ``score_task`` caches the
result keyed on (model version + training run + weights digest, data md5s, engine config
fingerprint, code, number of queries, device), so a rerun with nothing changed reuses the
scores. The cache is mirrorinf's own: arrays as .npy and reports as JSON, each array's sha256
in an HMAC-signed record (``mirrorinf.integrity``); nothing is pickled and no Prefect task
persists its result.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.analysis import SinkFactory, score_rows
from mirrorinf.calibration import calibration_scores
from mirrorinf.engine import NonFiniteScores
from mirrorinf.engine.examples import parts
from mirrorinf.errors import DataError, InputError
from mirrorinf.integrity import NpyFile, SignedRecords, remove_stale_tmp
from mirrorinf.params import TaskParams
from mirrorinf.shards import MAPPED, ShardStore
from mirrorinf.tasks.data import Split
from mirrorinf.usercode import load_callable, source_digest

__all__ = [
    "ScoreBundle",
    "assemble_task",
    "compute_scores",
    "load_cached_scores",
    "open_store_task",
    "pairwise_scores",
    "save_cached_scores",
    "score_cache_dir",
    "score_cache_key",
    "score_into",
    "score_shard_task",
    "score_task",
    "scoring_code_hash",
    "set_threads",
    "weights_digest",
]

logger = logging.getLogger(__name__)

SCORE_CACHE_DIR = ".mirrorinf/cache/scores"  # under the project root (the params file's folder)
_REQUIRED = ("pairwise", "self_influence", "group_influence", "query_self_drop")
_OPTIONAL = ("leak_pairwise", "calib_self_influence", "calib_group_influence")
_OPTIONAL += ("loss_after_fit", "calib_loss_after_fit")  # the harmful flag's scores


@dataclass
class ScoreBundle:
    """Engine outputs of one analysis (numpy, CPU) and their health reports.

    ``reports`` maps "pairwise" / "group" / "self" to ``ScoreReport.to_dict()`` (scale, zero
    fraction, constant queries, path, seconds); ``query_self_drop`` is each query's score
    against itself, on the pairwise scale. The ``calib_*`` arrays are the same scores on the
    (clean, held-out) validation set, which calibrate the flag thresholds in ``summarise``:
    its self-influence, and each validation example's group influence on the other folds.
    ``pairwise`` / ``leak_pairwise`` keep the engine's dtype (float32 by default) and, once
    cached or assembled from shards, are verified read-only memory maps of the store's .npy.
    ``stage_seconds``: wall time of this computation's steps (pairwise, group, self,
    calibration from the engine; store = writing and verifying the cache or shard record).
    """

    pairwise: np.ndarray
    self_influence: np.ndarray
    group_influence: np.ndarray
    query_self_drop: np.ndarray
    leak_pairwise: np.ndarray | None = None  # plain-mode pairwise when mode is not plain
    calib_self_influence: np.ndarray | None = None
    calib_group_influence: np.ndarray | None = None
    loss_after_fit: np.ndarray | None = None  # each row's loss after the validation group fit
    calib_loss_after_fit: np.ndarray | None = None  # each validation row's, its fold left out
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _engine(
    model: torch.nn.Module, cfg: ForwardInfConfig, device: str, task: TaskParams | None = None
) -> ForwardInf:
    """The engine for the task (kind, the user's loss imported from their code, output); its
    ValueError on construction (e.g. no CUDA for device "cuda") is input."""
    task = task or TaskParams()
    loss_fn = load_callable(task.loss, "task.loss") if task.loss else None
    try:
        return ForwardInf(
            model, config=cfg, loss_fn=loss_fn, device=device, kind=task.kind, output=task.output
        )
    except ValueError as err:
        raise InputError(f"cannot set up the engine: {err}") from None


def _magnitude(split: Split, row: int) -> float:
    """The largest |input| of one row of ``split`` (only that row is read)."""
    values = [v.abs().max() for v in parts(split.read(row, row + 1)) if v.numel()]
    return float(max(values).double()) if values else 0.0


@contextmanager
def finite_scores(split: Split, queries: Split | None = None, offset: int = 0) -> Iterator[None]:
    """The engine's NaN/inf scores (rows of ``split`` from ``offset``; pairwise columns are
    ``queries``) as bad input naming the example, its input magnitude and the way out: a row
    with extreme inputs (3e38 in a float32 file) overflowed, a traceback (exit 3) before."""
    try:
        yield
    except NonFiniteScores as err:
        if err.cell is None:
            raise InputError(str(err)) from None
        row, col = err.cell[0] + offset, err.cell[1]
        where = [(split, row)] + ([(queries, col)] if err.kind == "pairwise" and queries else [])
        named = ", ".join(
            f"{s.name} row id {str(s.ids[i])!r} of {s.provenance.path!r} "
            f"(largest |x| {_magnitude(s, i):.3g})"
            for s, i in where
        )
        raise DataError(
            f"{err.kind} scores are NaN or inf, first at {named}: that example's loss or update "
            "overflows; scale or clip the inputs as the model was trained on them, or drop the "
            "row (if its inputs look ordinary, the update diverged: set a smaller influence.lr "
            "or fewer influence.steps)"
        ) from None


def task_identity(task: TaskParams | None) -> dict[str, Any] | None:
    """What of the task changes scores, for cache keys (None for the default task); a custom
    loss counts with a digest of its source, so an edited loss is not served stale scores."""
    if task is None or task == TaskParams():
        return None
    ident: dict[str, Any] = task.model_dump()
    if task.loss:
        ident["loss_source"] = source_digest(load_callable(task.loss, "task.loss"))
    return ident


def compute_scores(
    model: torch.nn.Module,
    train: Split,
    val: Split,
    queries: Split,
    cfg: ForwardInfConfig,
    device: str = "auto",
    task: TaskParams | None = None,
    out: SinkFactory | None = None,
) -> ScoreBundle:
    """Pairwise (train x queries), group (validation set), self-influence, calibration scores.
    ``out``: where the engine writes the score matrices (see :func:`score_into`); None: in
    memory."""
    t0 = time.perf_counter()
    fi = _engine(model, cfg, device, task)
    with finite_scores(train, queries):
        rows, reports = score_rows(fi, train.examples(), queries.pair(), val.examples(), out=out)
    return _bundle(rows, reports, fi, val, cfg, t0, len(train), len(queries))


@contextmanager
def score_into(
    records: SignedRecords, name: str
) -> Iterator[tuple[SinkFactory, dict[str, NpyFile]]]:
    """(sink factory, the files it made): each score matrix the engine writes goes straight
    into a new float32 file of record ``name`` (temporary until :meth:`SignedRecords.write`
    takes it), so the matrix is never whole in memory; on an error the files are removed."""
    made: dict[str, NpyFile] = {}

    def sink(array: str, shape: tuple[int, int]) -> NpyFile:
        made[array] = records.new_array(name, array, shape, np.float32)
        return made[array]

    try:
        yield sink, made
    except BaseException:
        for f in made.values():
            f.discard()
        raise


def _bundle(
    rows: dict[str, Any],
    reports: dict[str, dict[str, Any]],
    fi: ForwardInf,
    val: Split,
    cfg: ForwardInfConfig,
    t0: float,
    n_train: int,
    n_query: int,
) -> ScoreBundle:
    """Per-row scores + the calibration scores of the validation set -> one bundle."""
    t_calib = time.perf_counter()
    with finite_scores(val):
        calib = calibration_scores(fi, val.examples(), seed=cfg.seed)
    stages = {k: float(reports[k]["seconds"]) for k in ("pairwise", "group", "self")
              if "seconds" in reports.get(k, {})}  # fmt: skip
    stages["calibration"] = time.perf_counter() - t_calib
    seconds = time.perf_counter() - t0
    logger.info("scored %d train x %d queries (+ group, self) in %.2f s", n_train, n_query, seconds)
    return ScoreBundle(
        pairwise=rows["pairwise"],
        self_influence=rows["self_influence"],
        group_influence=rows["group_influence"],
        query_self_drop=rows["query_self_drop"],
        leak_pairwise=rows.get("leak_pairwise"),
        calib_self_influence=calib.self_influence,
        calib_group_influence=calib.group_influence,
        loss_after_fit=rows.get("loss_after_fit"),
        calib_loss_after_fit=calib.loss_after_fit,
        reports=json.loads(json.dumps(reports, default=str)),
        seconds=seconds,
        stage_seconds=stages,
    )


@task(name="open-shard-store", cache_policy=NO_CACHE, persist_result=False)
def open_store_task(store_root: str, identity: dict[str, Any]) -> None:
    """Create the shard store, or clear it if it holds another model/data/config."""
    ShardStore(store_root, identity).open()


@task(
    name="score-shard",
    retries=1,
    retry_delay_seconds=1,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def score_shard_task(
    store_root: str,
    identity: dict[str, Any],
    start: int,
    stop: int,
    model: torch.nn.Module,
    train: Split,
    val: Split,
    queries: Split,
    cfg: ForwardInfConfig,
    device: str = "auto",
    threads: int | None = None,
    task: TaskParams | None = None,
) -> bool:
    """Score training rows [start, stop) into the shard store; skip a shard already there.

    ``threads``: torch CPU threads in this (possibly Dask worker) process. Returns True when it
    computed the shard, False when it was on disk (a resumed run).
    """
    store = ShardStore(store_root, identity)
    if store.done(start, stop):
        return False
    set_threads(threads)
    # a private copy: the engine's functional calls swap a module's tensors for the duration of
    # a forward pass, so one module object must not be scored from several threads at once
    fi = _engine(copy.deepcopy(model), cfg, device, task)
    # the whole training set is the curvature set: anchored scores equal the unsharded run's;
    # a lazy split reads only this shard's rows to score (the curvature reads its subsample)
    part = train.examples(start, stop)
    with (
        score_into(store.records, store.name(start, stop)) as (sink, files),
        finite_scores(train, queries, start),
    ):
        rows, reports = score_rows(
            fi, part, queries.pair(), val.examples(), curvature=train.examples(), out=sink
        )
        rows = {k: v for k, v in rows.items() if k not in files}
        store.save(start, stop, rows, json.loads(json.dumps(reports, default=str)), files)
    return True


@task(name="assemble-shards", cache_policy=NO_CACHE, persist_result=False)
def assemble_task(
    store_root: str,
    identity: dict[str, Any],
    ranges: list[tuple[int, int]],
    model: torch.nn.Module,
    val: Split,
    cfg: ForwardInfConfig,
    device: str,
    n_query: int,
    task: TaskParams | None = None,
) -> ScoreBundle:
    """All shards in training-row order, plus calibration scores, as one bundle."""
    t0 = time.perf_counter()
    rows, reports = ShardStore(store_root, identity).assemble_with_reports(ranges)
    t_store = time.perf_counter() - t0
    reports["shards"] = {"count": len(ranges), "store": store_root}
    bundle = _bundle(
        rows,
        reports,
        _engine(model, cfg, device, task),
        val,
        cfg,
        t0,
        len(rows["pairwise"]),
        n_query,
    )
    bundle.stage_seconds["store"] = t_store
    return bundle


def set_threads(n: int | None) -> None:
    """Set torch's CPU thread count (None leaves it alone).

    On small shared machines one thread is often much faster than oversubscribed cores.
    """
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pairwise_scores(
    path: Path,
    model: torch.nn.Module,
    train: Split,
    queries: Split,
    cfg: ForwardInfConfig,
    device: str = "auto",
    task: TaskParams | None = None,
) -> tuple[str, dict[str, Any]]:
    """Pairwise scores [n_train, n_query] (rows in training-file order) written by the engine
    straight into the float32 .npy ``path`` (under a temporary name, renamed when complete: the
    matrix is never whole in memory); (the file's md5, the score report)."""
    fi = _engine(model, cfg, device, task)
    out = NpyFile.temporary(path, (len(train), len(queries)), np.float32)
    try:
        with finite_scores(train, queries):
            report = fi.pairwise_into(train.examples(), queries.pair(), out).to_dict()
        md5 = out.digest("md5")
        out.commit(path)
    except BaseException:
        out.discard()
        raise
    report.pop("query_self_drop", None)
    return md5, json.loads(json.dumps(report, default=str))


@functools.cache
def scoring_code_hash() -> str:
    """Hash of the code that produces scores (the engine package and this module).

    Part of the cache key, so a changed engine never serves scores computed by the old one.
    """
    import mirrorinf

    files = [*sorted(Path(mirrorinf.__file__).parent.rglob("*.py")), Path(__file__)]
    digest = hashlib.sha256()
    root = Path(mirrorinf.__file__).parent
    for path in files:
        name = path.relative_to(root) if path.is_relative_to(root) else path.name
        digest.update(str(name).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, bytes), read in
    place. Part of the cache key: a registered version names its artifact, not its bytes, so
    an artifact rewritten in place (a re-upload, a restored backup, tampering) must not be
    served the scores of the weights it held before. About 1 s per GB of weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def score_cache_key(
    *,
    model_uri: str,
    model_run_id: str | None,
    weights: str,
    data_md5: dict[str, str],
    config_fingerprint: str,
    n_queries: int,
    device: str,
    task: dict[str, Any] | None = None,
) -> str:
    """Cache key of a scoring: what model, on which bytes, with which config and code."""
    fields = {
        "model": model_uri,
        "run": model_run_id,
        "weights": weights,
        "data": data_md5,
        "config": config_fingerprint,
        "n_queries": n_queries,
        "device": device,
        "code": scoring_code_hash(),
    }
    if task is not None:  # the default task keeps the keys it always had
        fields["task"] = task
    blob = json.dumps(fields, sort_keys=True)
    return "mirrorinf-scores-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


@task(name="score", cache_policy=NO_CACHE, persist_result=False)
def score_task(
    cache_key: str | None,
    model: torch.nn.Module,
    train: Split,
    val: Split,
    queries: Split,
    cfg: ForwardInfConfig,
    device: str = "auto",
    cache_dir: str | None = None,
    task: TaskParams | None = None,
) -> tuple[ScoreBundle, bool]:
    """(scores, from cache): a verified cache entry when there is one, else
    :func:`compute_scores`, then cached. ``cache_key`` or ``cache_dir`` None: no cache."""
    if cache_key is None or cache_dir is None:
        return compute_scores(model, train, val, queries, cfg, device, task), False
    t0 = time.perf_counter()
    cached = load_cached_scores(cache_dir, cache_key)
    if cached is not None:
        cached.stage_seconds = {"store": time.perf_counter() - t0}
        return cached, True
    records = SignedRecords(cache_dir, "scores")
    remove_stale_tmp(records.root, cache_key)  # under the version's scoring lock: no other writer
    # the engine writes the score matrices straight into the cache's files, batch by batch
    with score_into(records, cache_key) as (sink, files):
        bundle = compute_scores(model, train, val, queries, cfg, device, task, out=sink)
        t0 = time.perf_counter()
        save_cached_scores(cache_dir, cache_key, bundle, files)
    # from here on the matrix is the verified file, memory-mapped, not the engine's copy
    stored = load_cached_scores(cache_dir, cache_key)
    if stored is None:
        raise RuntimeError(f"the score cache {cache_key} in {cache_dir} failed verification")
    stored.stage_seconds = {**bundle.stage_seconds, "store": time.perf_counter() - t0}
    return stored, False


def score_cache_dir(root: str | Path) -> Path:
    """The score cache of a project: data-only signed records (git-ignored)."""
    return Path(root) / SCORE_CACHE_DIR


def load_cached_scores(cache_dir: str | Path, key: str) -> ScoreBundle | None:
    """The cached bundle of ``key`` if its record verifies (see mirrorinf.integrity), else None
    (an invalid entry is logged and discarded). Nothing is unpickled; the score matrices are
    hashed in blocks, then returned as read-only memory maps of the verified files (so are the
    per-row score vectors: at 1M rows 24 MB the process no longer holds)."""
    records = SignedRecords(cache_dir, "scores")
    got = records.read(key, mmap=MAPPED)
    if got is None:
        return None
    arrays, meta = got
    missing = sorted(set(_REQUIRED) - set(arrays))
    unknown = sorted(set(arrays) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        logger.warning("discarding score cache %s: arrays missing %s, unknown %s", key,
                       missing, unknown)  # fmt: skip
        records.discard(key)
        return None
    return ScoreBundle(**arrays, reports=meta["reports"], seconds=float(meta["seconds"]))


def save_cached_scores(
    cache_dir: str | Path,
    key: str,
    bundle: ScoreBundle,
    filled: dict[str, NpyFile] | None = None,
) -> None:
    """Cache a bundle as a signed record (arrays .npy, reports JSON). ``filled``: its score
    matrices, already written by the engine into the record's files (:func:`score_into`),
    which must then be stored (an OSError raises); else a failed write only warns: the scores
    are still returned, the next run computes them again."""
    root = Path(cache_dir)
    files = dict(filled or {})
    # under the version's scoring lock: no other writer of this key
    remove_stale_tmp(root, key, keep=[f.path for f in files.values()])
    arrays = {
        name: value
        for name in (*_REQUIRED, *_OPTIONAL)
        if name not in files and (value := getattr(bundle, name)) is not None
    }
    meta = {"reports": bundle.reports, "seconds": bundle.seconds}
    try:
        SignedRecords(root, "scores").write(key, arrays, meta, filled=files)
    except OSError as err:
        if files:
            raise
        logger.warning("cannot write the score cache in %s: %s; scores not cached", root, err)
