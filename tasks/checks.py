"""Great Expectations gate over the influence tables (``mirrorinf.summary.InfluenceTables``).

The suite, one expectation per line below (each result names its ``check``), with thresholds
from params.yaml (``mirrorinf.summary.GateThresholds``):

- ``self_influence_not_null`` / ``group_influence_not_null``: no NaN score
  (ExpectColumnValuesToNotBeNull). NaN means the engine lost precision or diverged.
- ``self_influence_finite`` / ``group_influence_finite``: no +-inf score
  (ExpectColumnValuesToBeBetween within the float64 range).
- ``self_influence_not_degenerate``: the standard deviation of self-influence is > 0
  (ExpectColumnStdevToBeBetween, strict minimum 0). All-equal scores (typically all 0: the loss
  difference vanished in float32) carry no information, so the flags built on them mean nothing.
- ``mislabel_fraction``: fraction of training examples flagged as suspected mislabels
  <= ``max_flagged_fraction`` (ExpectColumnMeanToBeBetween on the 0/1 flag).
- ``harmful_fraction``: fraction of harmful training examples (significantly negative influence
  on the validation set) <= ``max_harmful_fraction`` (ExpectColumnMeanToBeBetween on the flag).
- ``harmful_excess``: fraction of training rows the validation fit exposes (negative group
  influence, loss after the fit above the calibration rows' ``exposed_quantile``) <= the share
  clean held-out data explains + ``max_harmful_fraction`` + a 2-sigma margin
  (``mirrorinf.summary.max_exposed_fraction``; ExpectColumnMeanToBeBetween on the 0/1 column). The
  label-noise check that rests on many calibration rows, not on their largest loss
  (``mirrorinf.summary``, "Harmful excess"). Without losses after the fit it cannot be
  computed: the column is 0 and the limit 1.
- ``leaks``: the suspected-leak table has at most ``max_leaks`` rows
  (ExpectTableRowCountToBeBetween). A leak is a query whose top proponent scores at least
  ``leak_cosine`` in gradient cosine with the query (an exact duplicate has cosine 1.0).

The gate passes when every expectation passes. Great Expectations runs in an ephemeral context
(nothing written to disk) with progress bars and analytics off; it is imported lazily because
the import alone takes seconds. The entry points import it in a background thread while they
wait for the temporary Prefect API to start (another process): :func:`preload_gx`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf.io import scratch_array
from mirrorinf.summary import (
    GateThresholds,
    InfluenceTables,
    exposed_rows,
    max_exposed_fraction,
    summarise,
    target_labels,
)

if TYPE_CHECKING:
    from mirrorinf.tasks.data import Split
    from mirrorinf.tasks.score import ScoreBundle

__all__ = ["CheckResult", "check_task", "preload_gx", "summarise_and_check", "validate_tables"]

logger = logging.getLogger(__name__)

_FLOAT_MAX = float(np.finfo(np.float64).max)


@dataclass
class CheckResult:
    """Outcome of the gate suite.

    Attributes:
        success: True when every expectation passed.
        results: one dict per expectation: ``check`` (stable name, see the module docstring),
            ``expectation`` (GX expectation type), ``column``, ``success``, ``observed`` (the
            observed value: a statistic, or the count of offending rows) and ``threshold``.
        timings: seconds spent importing GX and validating (for --verbose and the README).
    """

    success: bool
    results: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [r["check"] for r in self.results if not r["success"]]

    def as_json(self) -> str:
        """Strict JSON (numpy types made plain; NaN and inf written as null)."""
        payload = {"success": self.success, "results": self.results, "timings": self.timings}
        return json.dumps(_plain(payload), indent=2, allow_nan=False)


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _import_gx() -> Any:
    """Import great_expectations with analytics off (the env var is read by GX itself)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types import base  # noqa: F401 - the check's config

    return gx


@contextmanager
def preload_gx() -> Iterator[None]:
    """Import Great Expectations in a thread while the block runs, then wait for it: its seconds
    of import overlap a block that waits on another process (the Prefect API's start-up). The
    block must import nothing itself (two threads importing the same packages contend for the
    GIL and can deadlock on import locks); the import is over when the block ends."""
    if "great_expectations" in sys.modules:
        yield
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _import_gx()
        except BaseException as err:  # the check imports it again and reports the error
            failed.append(err)

    thread = threading.Thread(target=run, name="gx-import", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        logger.debug("background import of great_expectations failed: %s", failed[0])


def _suites(gx: Any, th: GateThresholds, counts: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Expectations for the training table and for the leak table, each tagged with its check
    (``counts``: the summary's, for the limits computed from the calibration set)."""
    e = gx.expectations
    train: list[Any] = []
    for col in ("self_influence", "group_influence"):
        train.append(e.ExpectColumnValuesToNotBeNull(column=col, meta={"check": f"{col}_not_null"}))
        train.append(
            e.ExpectColumnValuesToBeBetween(
                column=col,
                min_value=-_FLOAT_MAX,
                max_value=_FLOAT_MAX,
                meta={"check": f"{col}_finite"},
            )
        )
    train.append(
        e.ExpectColumnStdevToBeBetween(
            column="self_influence",
            min_value=0.0,
            strict_min=True,
            meta={"check": "self_influence_not_degenerate"},
        )
    )
    train.append(
        e.ExpectColumnMeanToBeBetween(
            column="flag_mislabel",
            min_value=0.0,
            max_value=th.max_flagged_fraction,
            meta={"check": "mislabel_fraction"},
        )
    )
    train.append(
        e.ExpectColumnMeanToBeBetween(
            column="flag_harmful",
            min_value=0.0,
            max_value=th.max_harmful_fraction,
            meta={"check": "harmful_fraction"},
        )
    )
    train.append(
        e.ExpectColumnMeanToBeBetween(
            column="exposed",
            min_value=0.0,
            max_value=_exposed_limit(counts, th),
            meta={"check": "harmful_excess"},
        )
    )
    leaks = [
        e.ExpectTableRowCountToBeBetween(
            min_value=0, max_value=th.max_leaks, meta={"check": "leaks"}
        )
    ]
    return train, leaks


_THRESHOLD_TEXT = {
    "self_influence_not_null": "0 null",
    "group_influence_not_null": "0 null",
    "self_influence_finite": "0 non-finite",
    "group_influence_finite": "0 non-finite",
    "self_influence_not_degenerate": "> 0",
}


def _exposed_limit(counts: dict[str, Any], th: GateThresholds) -> float:
    """The harmful_excess limit at these thresholds, from the summary's calibration counts (1:
    not computable, always passes)."""
    tail = float(counts.get("exposed_tail", float("nan")))
    if not math.isfinite(tail):
        return 1.0
    m, n = int(counts["n_calib_group"]), int(counts["n_train"])
    return max_exposed_fraction(tail, m, n, th.max_harmful_fraction)


def _threshold(check: str, th: GateThresholds, counts: dict[str, Any]) -> Any:
    """The threshold a check compares with, as reported next to the observed value."""
    dynamic = {
        "mislabel_fraction": th.max_flagged_fraction,
        "harmful_fraction": th.max_harmful_fraction,
        "harmful_excess": _exposed_limit(counts, th),
        "leaks": th.max_leaks,
    }
    return dynamic.get(check, _THRESHOLD_TEXT.get(check))


def _row(res: Any, th: GateThresholds, counts: dict[str, Any]) -> dict[str, Any]:
    """One plain result dict from a GX ExpectationValidationResult."""
    cfg = res.expectation_config
    check = (cfg.meta or {}).get("check", cfg.type)
    detail = res.result or {}
    observed = detail.get("observed_value", detail.get("unexpected_count"))
    exc = res.exception_info or {}
    if exc.get("raised_exception"):
        logger.warning("GX expectation %s raised: %s", check, exc.get("exception_message"))
        observed = f"error: {exc.get('exception_message')}"
    return _plain(
        {
            "check": check,
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "success": bool(res.success),
            "observed": observed,
            "threshold": _threshold(check, th, counts),
        }
    )


def _column(n: int) -> np.ndarray:
    """A new float64 column of ``n`` rows in a file-backed scratch map (not anonymous memory:
    the training table's computed columns at any N)."""
    return np.asarray(scratch_array(n))


def _file_backed(values: np.ndarray) -> np.ndarray:
    """``values`` (e.g. a boolean flag: 0.0 / 1.0) as a float64 scratch column (:func:`_column`),
    converted as they are copied: no in-memory float64 copy."""
    out = _column(len(values))
    out[:] = values
    return out


def _exposed_column(train: pd.DataFrame, counts: dict[str, Any]) -> np.ndarray:
    """0/1 per training row: exposed by the validation fit (``mirrorinf.summary.exposed_rows``
    at the summary's threshold; all 0 without one), as a file-backed float64 column."""
    thr = float(counts.get("exposed_threshold", float("nan")))
    if not math.isfinite(thr):
        return _file_backed(np.zeros(len(train), dtype=bool))
    with np.errstate(invalid="ignore"):
        return _file_backed(
            exposed_rows(
                train["group_influence"].to_numpy(dtype=np.float64),
                train["loss_after_fit"].to_numpy(dtype=np.float64),
                thr,
            )
        )


def validate_tables(
    tables: InfluenceTables, thresholds: GateThresholds | None = None
) -> CheckResult:
    """Run the gate suite (module docstring) on the influence tables with Great Expectations.

    Builds one ephemeral GX context per call; only numeric columns are handed to GX (ids can be
    strings or objects; they are not checked here).
    """
    th = thresholds if thresholds is not None else GateThresholds()
    t0 = time.perf_counter()
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    t_import = time.perf_counter() - t0

    t1 = time.perf_counter()
    t = tables.train  # the float64 columns as they are (no copy), the flags as 0.0 / 1.0
    train = pd.DataFrame(
        {
            "self_influence": t["self_influence"].to_numpy(dtype=np.float64),
            "group_influence": t["group_influence"].to_numpy(dtype=np.float64),
            "flag_mislabel": _file_backed(t["flag_mislabel"].to_numpy()),
            "flag_harmful": _file_backed(t["flag_harmful"].to_numpy()),
            "exposed": _exposed_column(t, tables.counts),
        },
        copy=False,
    )
    leaks = pd.DataFrame({"score": tables.leaks["score"].astype("float64")})

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    source = context.data_sources.add_pandas("mirrorinf_influence")
    train_exps, leak_exps = _suites(gx, th, tables.counts)
    order = [exp.meta["check"] for exp in (*train_exps, *leak_exps)]
    rows: list[dict[str, Any]] = []
    for name, frame, exps in (("train", train, train_exps), ("leaks", leaks, leak_exps)):
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"mirrorinf_{name}"))
        for exp in exps:
            suite.add_expectation(exp)
        vd = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"mirrorinf_{name}", data=batch, suite=suite)
        )
        result = vd.run(batch_parameters={"dataframe": frame})
        rows.extend(_row(r, th, tables.counts) for r in result.results)
    rows.sort(key=lambda r: order.index(r["check"]) if r["check"] in order else len(order))
    # GX keeps the batch's DataFrame in the data source of its (global) context: drop it, or
    # the frame outlives the check (16 bytes a training row and more)
    context.data_sources.delete(source.name)
    t_validate = time.perf_counter() - t1

    success = bool(rows) and all(r["success"] for r in rows)
    out = CheckResult(
        success=success,
        results=rows,
        timings={"import_s": round(t_import, 3), "validate_s": round(t_validate, 3)},
    )
    logger.info(
        "influence gate %s (%d checks; failed: %s) in %.2f s (+%.2f s import)",
        "passed" if success else "failed",
        len(rows),
        ", ".join(out.failed) or "none",
        t_validate,
        t_import,
    )
    return out


def summarise_and_check(
    scores: ScoreBundle, train: Split, queries: Split, thresholds: GateThresholds
) -> tuple[InfluenceTables, CheckResult]:
    """Reviewable tables from the scores, then the Great Expectations gate suite on them
    (``CheckResult.timings["summary_s"]``: the seconds of the summary)."""
    t0 = time.perf_counter()
    tables = summarise(
        scores.pairwise,
        scores.self_influence,
        scores.group_influence,
        train_ids=train.ids,
        train_labels=target_labels(train.y),
        query_ids=queries.ids,
        query_self_drop=scores.query_self_drop,
        leak_pairwise=scores.leak_pairwise,
        train_x=train.row_access(),
        query_x=_arrays(queries.x),
        thresholds=thresholds,
        calib_self_inf=scores.calib_self_influence,
        calib_group_inf=scores.calib_group_influence,
        loss_after_fit=scores.loss_after_fit,
        calib_loss_after_fit=scores.calib_loss_after_fit,
        column=_column,
    )
    summary_s = time.perf_counter() - t0
    check = validate_tables(tables, thresholds)
    check.timings["summary_s"] = round(summary_s, 3)
    return tables, check


def _arrays(x: Any) -> Any:
    """A split's inputs as numpy (a dict of named inputs stays a dict: each part is compared)."""
    if isinstance(x, dict):
        return {k: v.numpy() for k, v in x.items()}
    return x.numpy()


check_task = task(
    summarise_and_check, name="summarise-and-check", cache_policy=NO_CACHE, persist_result=False
)
