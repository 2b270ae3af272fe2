"""The influence flow: params -> data (DVC / file) + model (MLflow) -> scores -> GX gate -> MLflow.

Composition only; every step is a task from ``tasks/`` and all math lives in ``mirrorinf``.
Importing this module sets quiet tool defaults (telemetry off, Prefect home under the project's
``.prefect/``) before Prefect is imported.

Concurrent runs on one store (see ``tasks/tracking.py``): writing the demo data and training the
demo model happen under a lock per model name (the demo is never registered twice); scoring a
model version happens under a lock per version (a second run waits, then reuses the first's
cached scores or shards instead of scoring again into the same store); the version's verdict
record is written once the run is FINISHED, and the FINISHED run that started last wins.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from mirrorinf.demo import evaluate_findings
from mirrorinf.errors import InputError
from mirrorinf.params import Params
from mirrorinf.shards import shard_ranges
from mirrorinf.summary import ranked_rows, suspect_noun
from mirrorinf.tasks.checks import check_task
from mirrorinf.tasks.data import (
    Split,
    ensure_writable,
    load_dataset_task,
    prepare_demo_task,
    read_json,
)
from mirrorinf.tasks.model import (
    ModelRef,
    check_fit,
    load_registered_model_task,
    predict_labels,
    tokenizer_of,
    train_and_register_task,
)
from mirrorinf.tasks.score import (
    assemble_task,
    open_store_task,
    score_cache_dir,
    score_cache_key,
    score_shard_task,
    score_task,
    set_threads,
    task_identity,
    weights_digest,
)
from mirrorinf.tasks.tracking import (
    code_version,
    influence_run,
    log_influence_task,
    log_review_task,
    log_stage_seconds,
    store_lock,
)
from mirrorinf.tasks.verdict import tag_model_version_task

__all__ = ["InfluenceResult", "influence_flow", "run_influence"]

logger = logging.getLogger(__name__)

TOP_N = 5  # rows of each finding list in the summary


@dataclass
class InfluenceResult:
    """What one influence analysis concluded (also the CLI's summary and ``summary.json``).

    Attributes:
        run_id: the MLflow influence run.
        verdict: "passed" or "failed" (the gate).
        reasons: one line per failed check (or "all N checks passed").
        model: name, version, uri, training run id, whether the demo model was reused.
        summary: counts, top suspected mislabels / leaks / harmful examples, score health,
            and recall of planted ground truth when known.
        stage_seconds: wall time per stage of the flow body.
        cache_hit: True when the scores came from the verified score cache (or every shard
            was on disk and verified).
    """

    run_id: str
    verdict: str
    reasons: list[str]
    model: dict[str, Any]
    summary: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stages:
    """Wall time per named stage: the flow's own (prepare, model, data, train, score, check,
    logging, review = predictions + plots + report + UI tables, publish: they add up to the
    flow body) and, dotted, parts of them: ``score.pairwise`` / ``.group`` / ``.self`` /
    ``.calibration`` (the engine; curvature is inside pairwise), ``score.store`` (writing and
    verifying the score matrix), ``check.summary`` (tables and flags), ``check.gx_import`` and
    ``check.gx`` (the Great Expectations import and suite). Logged as run metrics
    ``stage_seconds.<name>``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)

    def add(self, seconds: dict[str, float]) -> None:
        """Record stages timed elsewhere (inside a task)."""
        for name, value in seconds.items():
            self.seconds[name] = round(self.seconds.get(name, 0.0) + float(value), 3)


def _reasons(check: Any) -> list[str]:
    failed = [r for r in check.results if not r["success"]]
    if not failed:
        return [f"all {len(check.results)} checks passed"]
    return [f"{r['check']}: observed {r['observed']}, allowed {r['threshold']}" for r in failed]


def _records(frame: Any, columns: list[str], n: int = TOP_N) -> list[dict[str, Any]]:
    out = []
    for row in frame[columns].head(n).to_dict(orient="records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    return out


def _summary(
    tables: Any, scores: Any, truth_metrics: dict[str, float], kind: str = "classification"
) -> dict[str, Any]:
    mislabels = ranked_rows(tables, "self_influence", TOP_N, ascending=False, where="flag_mislabel")
    by_self = ranked_rows(tables, "self_influence", TOP_N, ascending=False)
    harmful = ranked_rows(tables, "group_influence", TOP_N, ascending=True, where="flag_harmful")
    leak_cols = [c for c in ("query_id", "train_id", "score", "cosine") if c in tables.leaks]
    leaks = tables.leaks.sort_values(leak_cols[-1], ascending=False)
    pair = scores.reports.get("pairwise", {})
    return {
        "task_kind": kind,
        "suspect_noun": suspect_noun(kind),
        "counts": dict(tables.counts),
        "top_mislabels": _records(
            mislabels, ["id", "label", "self_influence", "self_z", "flag_rule"]
        ),
        "top_self_influence": _records(
            by_self, ["id", "label", "self_influence", "flag_mislabel", "flag_rule"]
        ),
        "top_harmful": _records(
            harmful, ["id", "label", "group_influence", "group_z", "loss_after_fit"]
        ),
        "leaks": _records(leaks, leak_cols),
        "score_health": {
            kind: {k: rep.get(k) for k in ("scale", "zero_fraction", "n_constant_queries", "path")}
            for kind, rep in scores.reports.items()
            if kind != "shards"  # the shard plan, not an engine verb
        },
        "scale": pair.get("scale"),
        "truth": truth_metrics,
    }


def _data_rev(params: Params, ref: ModelRef | None) -> str | None:
    """The revision to read: params first, else the commit recorded when the model was trained."""
    if params.data.rev is not None or params.data.source != "dvc" or ref is None:
        return params.data.rev
    recorded = ref.training_data.get("train", {})
    if recorded.get("source") == "dvc" and recorded.get("commit"):
        logger.info("reading data at %s, the commit the model was trained on", recorded["commit"])
        return recorded["commit"]
    return None


def _load_sets(params: Params, rev: str | None) -> dict[str, Split]:
    d = params.data
    source = "dvc" if d.source == "dvc" else "file"
    repo = str(params.resolve(d.repo)) if source == "dvc" else None
    futures = {}
    for name, path in (("train", d.train), ("val", d.val), ("query", d.query)):
        target = path if source == "dvc" else str(params.resolve(path))
        futures[name] = load_dataset_task.submit(
            target,
            name=name,
            source=source,
            repo=repo,
            rev=rev,
            display_path=path,
            kind=params.task.kind,
            **d.reader(),
        )
    return {name: fut.result() for name, fut in futures.items()}


def _ground_truth(params: Params, rev: str | None) -> dict[str, Any] | None:
    d = params.data
    if d.ground_truth is not None:
        if d.source == "dvc":
            return read_json(d.ground_truth, source="dvc", repo=params.resolve(d.repo), rev=rev)
        return read_json(params.resolve(d.ground_truth))
    if d.source == "demo":
        path = params.resolve(d.train).parent / "ground_truth.json"
        return read_json(path) if path.is_file() else None
    return None


def _model_and_data(
    params: Params, stages: _Stages, uri: str
) -> tuple[Any, ModelRef, dict[str, Split], dict[str, Any] | None]:
    """The model version and the data it is scored on (training the demo model if asked)."""
    model = ref = None
    if params.data.source == "demo":
        with stages("prepare"):
            prepare_demo_task(
                params.demo.model_dump(),
                params.resolve(params.data.train),
                params.resolve(params.data.val),
                params.resolve(params.data.query),
            )
    if not params.model.train_demo:
        with stages("model"):
            model, ref = load_registered_model_task(
                params.model.name,
                params.model.version,
                params.model.alias,
                tracking_uri=uri,
                allow_pickle=params.model.allow_pickle,
            )
    rev = _data_rev(params, ref)
    with stages("data"):
        sets = _load_sets(params, rev)
        truth = _ground_truth(params, rev)
    if ref is None:
        if params.task != params.task.__class__():
            raise InputError(
                "the demo model is a digits classifier and takes no task settings: register "
                "your own model and set model.version (or model.alias), or remove the task section"
            )
        with stages("train"):
            trained = train_and_register_task(
                sets["train"],
                sets["val"],
                name=params.model.name,
                train_params=params.model.train.model_dump(),
                tracking_uri=uri,
                experiment=params.mlflow.experiment,
                artifact_location=params.artifact_location(),
            )
            # score the registered artifact itself, not the in-memory copy
            model, ref = load_registered_model_task(trained.name, trained.version, tracking_uri=uri)
            ref = replace(ref, reused=trained.reused)
    check_fit(model, list(sets.values()), params.task)
    return model, ref, sets, truth


def _image_norm(params: Params, train: Split) -> tuple[Any, Any] | None:
    """The (mean, std) an image folder was normalised with (data.image), for the review."""
    image = params.data.image
    if train.provenance.format != "images" or (image.mean is None and image.std is None):
        return None
    return image.mean, image.std


def _setup_lock(params: Params, uri: str) -> AbstractContextManager[Any]:
    """One run at a time writes the demo data and trains/registers the demo model (per model
    name and store), so two fresh runs do not register two versions of the same training."""
    if params.data.source == "demo" or params.model.train_demo:
        return store_lock(uri, f"setup-{params.model.name}")
    return nullcontext()


def _metrics(tables: Any, scores: Any, check: Any, truth: dict[str, float], hit: bool) -> dict:
    metrics = {
        **tables.counts,
        **{f"truth_{k}": v for k, v in truth.items()},
        "gate_passed": check.success,
        "cache_hit": hit,
        "score_seconds": scores.seconds,
        **{f"{k}_zero_fraction": r.get("zero_fraction") for k, r in scores.reports.items()},
    }
    return {k: v for k, v in metrics.items() if v is not None}


@flow(name="mirrorinf-influence", validate_parameters=False, persist_result=False)
def influence_flow(params: Params) -> InfluenceResult:
    """Score, check and log mirrored influence for one model version (see module docstring)."""
    stages = _Stages()
    uri = params.tracking_uri()
    set_threads(params.threads)
    with _setup_lock(params, uri):
        model, ref, sets, truth = _model_and_data(params, stages, uri)
    queries = (sets["query"] if params.queries.source == "query" else sets["val"]).head(
        params.queries.max_queries
    )
    datasets = {"train": sets["train"], "val": sets["val"], "query": queries}
    recorded = ref.training_data.get("train", {}).get("md5")
    same_data = recorded is None or recorded == sets["train"].provenance.md5
    if not same_data:
        logger.warning(
            "training data md5 %s differs from the md5 %s recorded when %s was trained",
            sets["train"].provenance.md5,
            recorded,
            ref.uri,
        )

    cfg = params.influence
    identity = score_cache_key(
        model_uri=ref.uri,
        model_run_id=ref.run_id,
        weights=weights_digest(model),
        data_md5={k: v.provenance.md5 for k, v in datasets.items()},
        config_fingerprint=cfg.fingerprint(),
        n_queries=len(queries),
        device=params.device,
        task=task_identity(params.task),
    )
    cache_dir = str(score_cache_dir(params.root)) if params.cache else None
    with influence_run(
        uri,
        params.mlflow.experiment,
        params.artifact_location(),
        model=ref,
        datasets={k: v.provenance for k, v in datasets.items()},
        params=params.model_dump(mode="json"),
        config=cfg.to_dict(),
        config_fingerprint=cfg.fingerprint(),
        code=code_version(params.root),
        extra_tags={"mirrorinf.data.matches_training": str(same_data).lower()},
    ) as run_id:
        # one scoring per model version at a time: a concurrent run waits, then hits the cache
        with stages("score"), store_lock(uri, f"scores-{ref.name}-v{ref.version}"):
            if params.sharding.size:
                scores, cache_hit = _score_sharded(params, ref, model, sets, queries, identity)
            else:
                scores, cache_hit = score_task(
                    identity, model, sets["train"], sets["val"], queries, cfg,
                    params.device, cache_dir=cache_dir, task=params.task,
                )  # fmt: skip
        stages.add({f"score.{k}": v for k, v in scores.stage_seconds.items()})
        with stages("check"):
            tables, check = check_task(scores, sets["train"], queries, params.gate.thresholds())
        stages.add({"check.summary": check.timings.get("summary_s", 0.0),
                    "check.gx_import": check.timings.get("import_s", 0.0),
                    "check.gx": check.timings.get("validate_s", 0.0)})  # fmt: skip
        verdict = "passed" if check.success else "failed"
        truth_metrics = {}
        if truth:
            truth_metrics = evaluate_findings(
                tables.train["id"].to_numpy(),
                tables.train["self_influence"].to_numpy(),
                tables.train.loc[tables.train["flag_mislabel"], "id"].to_numpy(),
                queries.ids,
                tables.leaks[["query_id", "train_id"]].to_numpy(),
                truth,
            )
        summary = _summary(tables, scores, truth_metrics, params.task.kind)
        reasons = _reasons(check)
        with stages("logging"):
            log_influence_task(
                uri,
                run_id,
                scores=scores,
                tables=tables,
                check=check,
                metrics=_metrics(tables, scores, check, truth_metrics, cache_hit),
                summary={"verdict": verdict, "reasons": reasons, **summary},
                verdict=verdict,
            )
        with stages("review"):
            log_review_task(
                uri, run_id, tables=tables, check=check, train=sets["train"], queries=queries,
                predicted=predict_labels(model, sets["train"], task=params.task), verdict=verdict,
                reasons=reasons, model=ref, kind=params.task.kind, tokenizer=tokenizer_of(model),
                image_norm=_image_norm(params, sets["train"]),
            )  # fmt: skip
        log_stage_seconds(uri, run_id, stages.seconds)
    # the run is FINISHED with every artifact and its own verdict: only now the version's record
    with stages("publish"):
        tag_model_version_task(
            uri,
            ref.name,
            ref.version,
            verdict=verdict,
            run_id=run_id,
            alias_on_pass=params.gate.alias_on_pass,
        )
    logger.info("influence gate %s for %s (run %s)", verdict, ref.uri, run_id)
    origin = "from registry"
    if params.model.train_demo:
        origin = "demo model reused" if ref.reused else "demo model trained and registered"
    return InfluenceResult(
        run_id=run_id,
        verdict=verdict,
        reasons=reasons,
        model={**ref.to_dict(), "origin": origin},
        summary=summary,
        stage_seconds=stages.seconds,
        cache_hit=cache_hit,
    )


def _shard_threads(params: Params) -> int | None:
    """torch threads per shard task: params.threads, else on a local Dask cluster the cores
    split between its worker processes (each would take them all: oversubscribed, slower)."""
    if params.threads is not None or params.runner != "dask" or params.dask.address:
        return params.threads
    return max(1, (os.cpu_count() or 1) // params.dask.workers)


def _shard_progress(futures: list[Any]) -> None:
    """A progress bar over shards as they finish, on a terminal only (quiet in CI and logs)."""
    if len(futures) < 2 or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return
    from prefect.futures import as_completed
    from tqdm import tqdm

    for _ in tqdm(as_completed(futures), total=len(futures), desc="shards", leave=False):
        pass


def _score_sharded(
    params: Params,
    ref: ModelRef,
    model: Any,
    sets: dict[str, Split],
    queries: Split,
    identity: str,
) -> tuple[Any, bool]:
    """Map the shard task over training-row ranges, then assemble; (bundle, all on disk)."""
    assert params.sharding.size is not None
    ranges = shard_ranges(len(sets["train"]), params.sharding.size)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{ref.name}-v{ref.version}")
    root = str(params.root / params.sharding.dir / name)
    ident = {"scores": identity, "shard_size": params.sharding.size}
    open_store_task(root, ident)
    cfg = params.influence
    futures = score_shard_task.map(
        unmapped(root), unmapped(ident), [r[0] for r in ranges], [r[1] for r in ranges],
        unmapped(model), unmapped(sets["train"]), unmapped(sets["val"]), unmapped(queries),
        unmapped(cfg), unmapped(params.device), unmapped(_shard_threads(params)),
        unmapped(params.task),
    )  # fmt: skip
    _shard_progress(futures)
    computed = [f.result() for f in futures]
    logger.info(
        "shards: %d scored, %d reused from %s", sum(computed), len(ranges) - sum(computed), root
    )
    bundle = assemble_task(
        root, ident, ranges, model, sets["val"], cfg, params.device, len(queries), params.task
    )
    return bundle, not any(computed)


@contextmanager
def _task_runner(params: Params) -> Iterator[Any]:
    """The task runner named in params. For Dask, one Prefect API is started first (unless one
    is configured) and its URL exported, so that worker processes report to it instead of each
    starting their own; it is stopped after the flow (and its cluster) ended and logs drained."""
    if params.runner == "threads":
        yield ThreadPoolTaskRunner(max_workers=3)
        return
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise InputError("runner: dask needs prefect-dask: pip install 'mirrorinf[dask]'") from None
    from mirrorinf.tasks.server import prefect_api

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    exported = "PREFECT_API_URL" not in os.environ
    # the configured API (or a test harness), else a temporary one that dies with this process
    with prefect_api() as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # worker processes report to it too
        try:
            if params.dask.address:
                yield DaskTaskRunner(address=params.dask.address)
            else:
                yield DaskTaskRunner(
                    cluster_kwargs={"n_workers": params.dask.workers, "threads_per_worker": 1,
                                    "processes": True, "dashboard_address": None,
                                    "host": "127.0.0.1"}
                )  # fmt: skip
        finally:
            if exported:
                os.environ.pop("PREFECT_API_URL", None)


def _prune_history(keep: int | None) -> None:
    """Keep the newest ``keep`` influence flow runs in a temporary API's store (``.prefect/``):
    it would otherwise grow with every run. Never a configured server's; never fails a run."""
    from mirrorinf.tasks.server import api_is_temporary, prune_flow_runs

    if keep is None or not api_is_temporary():
        return
    try:
        deleted = prune_flow_runs(influence_flow.name, keep)
    except Exception as err:  # housekeeping: the verdict is already written
        logger.warning("could not prune old Prefect flow runs: %s", err)
        return
    if deleted:
        logger.info("deleted %d old influence flow runs from the Prefect store", deleted)


def run_influence(params: Params) -> InfluenceResult:
    """Run :func:`influence_flow` with the task runner named in params, then prune old runs."""
    ensure_writable(params.output_dirs())  # before any run starts: a clear error, nothing left
    with _task_runner(params) as runner:
        try:
            return influence_flow.with_options(task_runner=runner)(params)
        finally:
            _prune_history(params.prefect.keep_runs)
