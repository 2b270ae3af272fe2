"""Turn influence score arrays into reviewable tables (numpy + pandas only).

``summarise`` takes the engine's outputs (pairwise scores for the queries, self-influence and
validation-group influence of every training example) and returns :class:`InfluenceTables`:
one row per training example with robust z-scores and flags, the top proponents and opponents
of every query, and the suspected leaks. The thresholds live in :class:`GateThresholds`, the
same model the Great Expectations gate (``tasks.checks``) reads, so flags and gate agree.

Sign convention (the whole product): positive score = proponent; negative group influence on
the validation set = the training example hurts held-out performance.

Rules (they go into the README):

- Robust z-score: ``z = 0.6745 * (x - median) / MAD`` (Iglewicz-Hoaglin modified z; 0.6745 makes
  it comparable to a Gaussian z). If the MAD is 0 (over half the values equal), the mean absolute
  deviation is used instead (``z = (x - median) / (1.2533 * MeanAD)``); if that is 0 too (all
  values equal), every z is 0. Non-finite values are left out of median and MAD and get z = NaN
  (never flagged; the Great Expectations suite fails on them). The z columns are descriptive;
  the flags use them only in the uncalibrated fallback below.
- Calibration set: clean, labelled, held-out examples (normally the validation set) scored by
  the same engine with the same settings as the training set: ``calib_self_inf`` = their
  self-influence, ``calib_group_inf`` = each one's group influence on the calibration set
  *without itself* (e.g. 5-fold: score fold k against the other folds), ``calib_loss_after_fit``
  = each one's loss after that fit on the other folds. Conformal threshold of
  m finite calibration scores ``c`` at rate alpha: ``T(c, alpha)`` = the k-th smallest ``c``
  with ``k = ceil((m + 1) * (1 - alpha))``, capped at ``k = m`` (the largest score) when
  ``m + 1 < 1 / alpha``; ``alpha_eff = (m + 1 - k) / (m + 1)`` (reported in ``counts``; above
  alpha only when capped, so use m >= 1 / alpha - 1 calibration examples, ~100 for 0.01).
- Harmful (calibrated): ``group_influence < 0`` and
  ``loss_after_fit > T(calib_loss_after_fit, harmful_alpha)``, where ``loss_after_fit`` is each
  training row's loss under the parameters of the group fit on the validation set (the engine's
  ``ScoreReport.loss_after_fit``; ``group_influence`` = loss before - loss after) and
  ``calib_loss_after_fit`` each calibration row's loss after the fit on the *other* folds.
  Without the losses (an older score cache) the previous rule: ``-group_influence >
  T(-calib_group_inf, harmful_alpha)`` (``counts["harmful_by_loss_after_fit"]`` says which;
  ``harmful_threshold`` is on that rule's scale).
- Suspected mislabel (calibrated): ``self_influence > T(calib_self_inf, mislabel_alpha)``
  (far more atypical than any clean held-out point), or harmful and
  ``self_influence > quantile(calib_self_inf, harmful_atypical_quantile)`` (hurts clean data
  *and* is hard to fit). A clean example is flagged with probability <= mislabel_alpha +
  harmful_alpha (union bound). The first branch alone flagged none of the demo's 80 flipped
  labels (fitted training points score below held-out ones); the harmful branch has precision
  1.0 and recall 0.46 there (0.81 when harmful thresholded the group influence).
- Why: a clean training example whose score is exchangeable with the calibration scores is
  flagged with probability <= alpha_eff (split conformal). Training examples were fitted, so
  the question is which score a fitted clean row has *no more* of than a held-out one.
  Self-influence: the measured answer below. The loss after the validation fit: a held-out
  calibration row is fitted by neither the model nor its fold's validation fit, a clean training
  row by the model (and, like the calibration row, not by the fit, which uses other rows), so on
  clean data its loss after the fit is stochastically below a held-out row's and the harmful
  flag errs towards fewer flags. The group influence itself has no such order: a fitted row's
  base loss is ~0, so its group influence is ~ -(loss after the fit), while a held-out row's
  large base loss cancels part of its own; thresholding ``-group_influence`` was too lax.
  The price of conservative thresholds: label noise the model has memorised also scores like
  clean held-out data and is not flagged.
  Measured (``benchmarks/gate_calibration.py --seeds 8 --datasets wine cancer``: MLPs,
  converged and early-stopped, default engine, 32 clean runs): harmful flagged on clean labels
  at most 4.5% (wine, 50 calibration rows: alpha_eff = 2%, and the realised rate of one run
  varies around it), over 5% in 0 of 32 runs, so the gate passes 32/32 (mislabel flags at most
  4.5%; with the group-influence threshold: up to 10.9%, 3 of 32 over 5%). With 30% flipped
  labels the gate fails 27 of 32 (every early-stopped run; converged: wine 4/8, cancer 7/8,
  where the model memorised the flips; the group-influence threshold failed 32/32). Digits
  (``--datasets digits``, 300 calibration rows, alpha_eff 1%): clean at most 0.6% (group
  threshold: 1.6%), 30% flips fail 14 of 16 (converged 6/8; group threshold 16/16). A longer
  group fit (``--group-fit 50x0.03``) fails all 16 converged runs at 30% but lets one clean
  wine run flag 5.5%.
- Harmful excess (the gate's label-noise check, ``harmful_excess``; needs the losses after the fit):
  a training row is *exposed* when ``group_influence < 0`` and ``loss_after_fit >
  T(calib_loss_after_fit, 1 - exposed_quantile)`` (0.9: the clean held-out rows' 90% quantile, tail
  mass ``exposed_tail`` = alpha_eff). The gate fails when ``exposed_fraction > max_exposed_fraction
  = exposed_tail + max_harmful_fraction + 2 sd``, with sd the spread of a clean set's exposed
  fraction (:func:`max_exposed_fraction`). Why: the per-row harmful flag thresholds at alpha 0.01,
  which on 100 calibration rows is their largest loss, one hard validation row; on the small DVC
  demo (``benchmarks/fit_target_noise.py --seeds 10``) that maximum ranged 1.7-12.8 and 30% flipped
  labels failed the flag-count checks in only 4 of 10 seeds (8 of 10 with this check). A count above
  the 90% quantile rests on ten calibration rows, not one: clean training rows, which the model
  fitted, sit below held-out ones, and flips the fit exposes sit far above (loss ~3 against a 90%
  quantile ~0.6). ``benchmarks/gate_calibration.py`` (wine, cancer, digits; converged and
  early-stopped; 4 seeds, 24 runs each): the excess ``exposed_fraction - exposed_tail`` at quantiles
  0.5 / 0.8 / 0.9 / 0.99 is at most -0.105 / -0.014 / -0.004 / +0.002 on clean labels and at least
  -0.194 / +0.104 / +0.138 / -0.011 with 30% flips: 0.9 separates best (the margin adds 0.05-0.09
  for 300-50 calibration rows). With the check, 8 seeds (``--seeds 8 --flips 0 0.1 0.3``, rule
  ``excess``): clean runs pass 48 of 48, 30% flips fail 45 of 48 (flag counts alone: 41). The
  margin: clean rows exchangeable with the calibration rows (the worst case: a model that fitted
  nothing) exceed the limit in 0.25% of 400 draws at m = 50, n = 400, against 12.8% without it
  (tests/test_summary.py); fitted training rows sit lower still. Its price: with 50 calibration rows
  about 14% of the training rows must be exposed beyond the clean tail before the check fails (about
  12% with 100, 10% with 300, with 400 training rows).
- Fallback without calibration scores (a warning is logged): suspected mislabel when
  ``self_z > mislabel_z``; harmful when ``group_influence < 0`` and ``group_z < -harmful_z``.
  Not calibrated: real self-influence spans orders of magnitude, and on clean data this flags
  33-45% of the training set (``benchmarks/gate_calibration.py``), so the gate fails every run.
- Suspected leak: for each query, the training example whose gradient is most aligned with the
  query's, ``cosine = score / sqrt(self_influence * query_self_drop)`` (all three from the same
  plain-mode engine on the same per-unit-lr scale, so this is the cosine of the two gradients
  measured with forward passes), is a suspected leak when that cosine >= ``leak_cosine``
  (0.99). An exact duplicate has cosine 1.0 (measured 0.9999-1.0 on digits); the most aligned
  non-duplicate held-out digit reached 0.96. Queries or training rows with a non-positive
  self-drop / self-influence are skipped (the cosine is undefined). When the inputs are given,
  the pair must also be a near-copy, ``||x_q - x_i|| <= leak_input_distance * ||x_q||`` (0.05):
  for a 2-class model the output-error part of every gradient points the same way, and on
  breast-cancer data 19 of 69 clean queries reached cosine 0.99 without any duplicate. The
  near-copy test fits the input: float inputs by that relative distance, integer inputs (token
  ids) only by exact equality of the whole sequence (distance 0, else inf), and several named
  inputs by the largest distance over the parts (every part must be a near-copy).
- Which rule flagged an example (:func:`flag_rules`): "self-influence" (above the conformal
  threshold, or the robust-z fallback) or "harmful and atypical". For regression and multilabel
  tasks a suspected mislabel is a *suspect target*; the rules are the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "GateThresholds",
    "InfluenceTables",
    "conformal_threshold",
    "exposed_rows",
    "flag_rule_masks",
    "flag_rules",
    "head_positions",
    "input_distance",
    "max_exposed_fraction",
    "ranked_rows",
    "robust_z",
    "summarise",
    "suspect_noun",
    "target_labels",
]

logger = logging.getLogger(__name__)

_MAD_TO_SIGMA = 0.6745  # Phi^-1(0.75): MAD of a standard normal
_MEANAD_TO_SIGMA = 1.2533  # sqrt(pi / 2): mean absolute deviation of a standard normal, inverted


class GateThresholds(BaseModel):
    """Thresholds of the influence flags and of the gate; read from params.yaml (``gate:``).

    Unknown keys are an error, so a typo in params.yaml cannot silently fall back to a default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mislabel_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Calibrated rule: target rate of clean training examples flagged as "
        "suspected mislabels (conformal quantile of the calibration self-influence). Keep it "
        "well below max_flagged_fraction: the realised rate varies with the calibration set.",
    )
    harmful_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Calibrated rule: target rate of clean training examples flagged as "
        "harmful (conformal quantile of the calibration group influence, negated).",
    )
    harmful_atypical_quantile: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Calibrated rule: a harmful example is also a suspected mislabel when its "
        "self-influence exceeds this quantile of the calibration self-influence (atypical "
        "for a point the model was trained on).",
    )
    mislabel_z: float = Field(
        3.5,
        gt=0,
        description="Fallback without calibration scores: robust z-score of self-influence "
        "above which a training example is a suspected mislabel (uncalibrated).",
    )
    harmful_z: float = Field(
        3.5,
        gt=0,
        description="Fallback without calibration scores: harmful when the validation-group "
        "influence is negative and its robust z-score is below -harmful_z (uncalibrated).",
    )
    max_flagged_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Gate: largest allowed fraction of training examples flagged as suspected "
        "mislabels.",
    )
    max_harmful_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Gate: largest allowed fraction of harmful training examples, and the "
        "largest allowed excess of training rows above the exposed_quantile (harmful_excess).",
    )
    exposed_quantile: float = Field(
        0.9,
        gt=0.5,
        lt=1,
        description="Gate (harmful_excess): quantile of the calibration rows' loss after the "
        "validation fit above which a training row with negative group influence counts as "
        "exposed; the gate fails when more rows are exposed than clean held-out data explains "
        "(1 - this quantile, plus a 2-sigma margin) by over max_harmful_fraction. Measured, not "
        "derived: 0.9 separates clean from 30%-flipped labels best of 0.5 / 0.8 / 0.9 / 0.99.",
    )
    leak_cosine: float = Field(
        0.99,
        gt=0,
        le=1,
        description="A query's most gradient-aligned training example is a suspected leak "
        "when the cosine score / sqrt(self_influence * query_self_drop) reaches this (an exact "
        "duplicate has 1.0; held-out digits reached at most 0.96).",
    )
    leak_input_distance: float = Field(
        0.05,
        ge=0,
        description="When inputs are given, a suspected leak must also be a near-copy: "
        "||x_query - x_train|| <= this * ||x_query|| (gradients alone cannot tell apart "
        "examples of a 2-class model whose hidden features align).",
    )
    max_leaks: int = Field(0, ge=0, description="Gate: largest allowed number of suspected leaks.")
    top_k: int = Field(
        10, ge=1, description="Proponents and opponents listed per query in the queries table."
    )


@dataclass
class InfluenceTables:
    """Reviewable tables of one influence analysis.

    Attributes:
        train: one row per training example, in training-file order: ``id, label,
            self_influence, self_z, group_influence, group_z, flag_mislabel, flag_harmful``.
        queries: ``query_id, rank, kind, train_id, score``; for every query the ``top_k``
            highest scores (kind "proponent", rank 1 = highest) and the ``top_k`` lowest
            (kind "opponent", rank 1 = lowest). Signs are kept, so with few negative scores an
            "opponent" row may still have a positive score.
        leaks: ``query_id, train_id, score, ratio``: suspected leaks (see the module docstring).
        counts: plain-Python numbers for logging as metrics (sizes, flag counts and fractions,
            non-finite counts, and per flag whether it was calibrated, its threshold on the
            score's own scale and alpha_eff; NaN where the fallback rule was used).
    """

    train: pd.DataFrame
    queries: pd.DataFrame
    leaks: pd.DataFrame
    counts: dict[str, int | float] = field(default_factory=dict)


def _as_float(x: Any, name: str, ndim: int) -> np.ndarray:
    """numpy float64 view of a numpy / torch / sequence input with the expected rank."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {err}") from err
    if arr.ndim != ndim:
        shape = "[n_train, n_query]" if ndim == 2 else "one-dimensional"
        raise ValueError(f"{name} must be {shape}, got shape {arr.shape}")
    return arr


def _as_ids(x: Any, n: int, name: str) -> np.ndarray:
    """Ids or labels as a 1-D array of length ``n``; ``None`` means 0..n-1."""
    if x is None:
        return np.arange(n, dtype=np.int64)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name} must be one-dimensional of length {n}, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind in "US":
        return arr.astype(str, copy=False)
    return arr


def suspect_noun(kind: str) -> str:
    """What a flagged example is called for a task kind: a suspected mislabel, or for
    regression and multilabel tasks a suspect target."""
    return "suspect target" if kind in ("regression", "multilabel") else "suspected mislabel"


def head_positions(
    values: Any, n: int, *, ascending: bool, rows: Any = None, stable: bool = False
) -> np.ndarray:
    """Row positions of the first ``n`` rows of ``sort_values(ascending=...)`` on a table
    column (``values``; ``rows``: only these positions, e.g. the flagged ones; ``stable``:
    ``kind="stable"``, ties in row order, as ``nsmallest``), in that order, without sorting
    or copying the table: a partial selection, exact when the ``n`` best values are distinct
    and apart from the rest; else pandas' own sort of the column."""
    v = np.asarray(values)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        return rows[head_positions(v[rows], n, ascending=ascending, stable=stable)]
    n = min(n, len(v))
    if 0 < n < len(v) and v.dtype.kind == "f":
        key = v if ascending else -v  # NaN stays NaN, which numpy orders last
        cand = np.argpartition(key, n)[: n + 1]
        order = cand[np.argsort(key[cand], kind="stable")]
        best = key[order]
        if np.all(best[1:] > best[:-1]):  # distinct and apart (NaN compares False)
            return order[:n]
    kind = "stable" if stable else "quicksort"
    ranked = pd.Series(v, copy=False).sort_values(ascending=ascending, kind=kind)
    return ranked.index[:n].to_numpy(dtype=np.int64)  # the default index: positions


def flag_rule_masks(train: pd.DataFrame, counts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per training row, whether the "self-influence" rule (the self-influence threshold, or
    the robust-z fallback) or the "harmful and atypical" rule flagged it as a suspected
    mislabel: two boolean arrays (one byte a row; :func:`flag_rules` names them)."""
    flagged = train["flag_mislabel"].to_numpy(dtype=bool)
    thr = float(counts.get("mislabel_threshold", float("nan")))
    if not math.isfinite(thr):  # fallback: the z rule only
        return flagged, np.zeros_like(flagged)
    s = train["self_influence"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        by_self = flagged & (s > thr)
    return by_self, flagged & ~by_self


def flag_rules(train: pd.DataFrame, counts: dict[str, Any]) -> np.ndarray:
    """Per training row, which rule flagged it as a suspected mislabel: "self-influence" (the
    self-influence threshold, or the robust-z fallback), "harmful and atypical", or "".
    A string a row: call it on the rows shown, count with :func:`flag_rule_masks`."""
    by_self, by_harm = flag_rule_masks(train, counts)
    return np.where(by_self, "self-influence", np.where(by_harm, "harmful and atypical", ""))


def ranked_rows(
    tables: InfluenceTables, column: str, n: int, *, ascending: bool, where: str | None = None
) -> pd.DataFrame:
    """The first ``n`` training rows by ``column`` (only those whose boolean column ``where``
    is true), as ``train[train[where]].sort_values(column, ascending=...).head(n)`` orders
    them, with their ``flag_rule``: picked by position, no sorted or filtered copy of the
    table (at 1M rows that copy was the largest allocation after scoring)."""
    train = tables.train
    rows = None if where is None else np.flatnonzero(train[where].to_numpy(dtype=bool))
    pos = head_positions(train[column].to_numpy(), n, ascending=ascending, rows=rows)
    shown = train.iloc[pos]
    return shown.assign(flag_rule=flag_rules(shown, tables.counts))


def target_labels(y: Any) -> np.ndarray:
    """Targets as one value per example for the tables: as they are when one-dimensional; else
    a short string per row (multilabel 0/1 rows, token labels of a sequence)."""
    arr = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    if arr.ndim <= 1:
        return arr
    flat = arr.reshape(len(arr), -1)
    fmt = (lambda v: f"{v:g}") if flat.dtype.kind == "f" else str
    out = [",".join(fmt(v) for v in row[:16]) + (",..." if len(row) > 16 else "") for row in flat]
    return np.asarray(out, dtype=str)


def _part_distance(tx: np.ndarray, qx: np.ndarray) -> np.ndarray:
    """Per query, how far it is from its matched training row: integer inputs 0 when equal
    (else inf); float inputs ``||x_q - x_i|| / ||x_q||``."""
    n = len(qx)
    tx, qx = tx.reshape(n, -1), qx.reshape(n, -1)
    if tx.shape[1] != qx.shape[1]:
        raise ValueError(f"train_x has {tx.shape[1]} features but query_x has {qx.shape[1]}")
    if tx.dtype.kind in "iub" and qx.dtype.kind in "iub":
        return np.where((tx == qx).all(axis=1), 0.0, np.inf)
    tf, qf = tx.astype(np.float64), qx.astype(np.float64)
    return np.linalg.norm(qf - tf, axis=1) / np.maximum(np.linalg.norm(qf, axis=1), 1e-12)


def input_distance(train_x: Any, query_x: Any, best_idx: np.ndarray) -> np.ndarray:
    """Near-copy distance of each query to training row ``best_idx`` (module docstring); the
    inputs are arrays/tensors, or dicts of them (several named inputs: the largest part).
    Only the matched training rows are indexed (a lazy view reads just those)."""

    def arr(v: Any) -> np.ndarray:
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

    if isinstance(train_x, dict) != isinstance(query_x, dict):
        raise ValueError("train_x and query_x must both be arrays or both be dicts of arrays")
    if isinstance(train_x, dict):
        if set(train_x) != set(query_x):
            raise ValueError(f"train_x has inputs {sorted(train_x)}, query_x {sorted(query_x)}")
        parts = [_part_distance(arr(train_x[k][best_idx]), arr(query_x[k])) for k in train_x]
        return np.max(np.stack(parts), axis=0)
    return _part_distance(arr(train_x[best_idx]), arr(query_x))


def robust_z(values: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Modified z-score ``0.6745 * (x - median) / MAD`` (MeanAD fallback; 0 when all equal).

    Robust to the outliers it is meant to find: one huge value does not hide itself by inflating
    the scale, as it would with mean and standard deviation. Non-finite inputs give NaN.
    ``out``: a float64 array of the input's length to write the scores into (and return).
    """
    x = _as_float(values, "values", 1)
    z = np.empty(x.shape) if out is None else out
    z.fill(np.nan)
    finite = np.isfinite(x)
    if not finite.any():
        return z
    # in place on one copy of the finite values (the same float64 operations, in the same
    # order, as the plain expressions): a few [n] temporaries, not one per step
    v = x[finite]
    med = np.median(v)
    v -= med
    dev = np.abs(v)
    mad = np.median(dev, overwrite_input=True)  # reorders dev: its mean is recomputed below
    if mad > 0:
        v *= _MAD_TO_SIGMA
        v /= mad
        z[finite] = v
    else:
        mean_ad = np.abs(v, out=dev).mean()
        if mean_ad > 0:
            v /= _MEANAD_TO_SIGMA * mean_ad
            z[finite] = v
        else:
            z[finite] = 0.0
    return z


def conformal_threshold(calib: Any, alpha: float) -> tuple[float, float, int]:
    """Split-conformal threshold of calibration scores: ``(threshold, alpha_eff, m)``.

    ``threshold`` is the k-th smallest of the m finite scores, ``k = ceil((m + 1)(1 - alpha))``
    capped at m, so that a new score exchangeable with them exceeds it with probability
    ``alpha_eff = (m + 1 - k) / (m + 1)`` (<= alpha unless capped). With no finite score the
    result is ``(nan, nan, 0)``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    c = _as_float(calib, "calibration scores", 1)
    c = c[np.isfinite(c)]
    m = len(c)
    if m == 0:
        return float("nan"), float("nan"), 0
    k = min(math.ceil((m + 1) * (1 - alpha) - 1e-9), m)  # tolerance: 100 * (1 - 0.1) = 90.000..1
    k = max(k, 1)
    return float(np.partition(c, k - 1)[k - 1]), (m + 1 - k) / (m + 1), m


def exposed_rows(group_inf: np.ndarray, loss_after: np.ndarray, threshold: float) -> np.ndarray:
    """Training rows the validation fit exposes (harmful_excess): negative group influence and a
    loss after the fit above ``threshold`` (the calibration rows' exposed_quantile)."""
    return (group_inf < 0) & (loss_after > threshold)


def max_exposed_fraction(tail: float, m: int, n: int, excess: float) -> float:
    """The harmful_excess limit: the fraction of exposed rows clean data explains, ``tail`` (the
    conformal tail mass of m calibration rows), plus the allowed ``excess``, plus two standard
    deviations of a clean set's exposed fraction: the quantile's own spread over m calibration
    rows (Beta order statistic, variance tail (1 - tail) / (m + 2)) and the binomial spread of
    n training rows. Capped at 1."""
    sd = math.sqrt(tail * (1 - tail) * (1 / (m + 2) + 1 / max(n, 1)))
    return min(1.0, tail + excess + 2 * sd)


def _top_k(pairwise: np.ndarray, k: int, *, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [k, n_query] of the k largest (or smallest) scores per column, best first.

    Ties keep training-file order; non-finite scores rank last.
    """
    key = np.where(np.isfinite(pairwise), -pairwise if largest else pairwise, np.inf)
    n_train = key.shape[0]
    if k < n_train:
        # O(n) selection, ties at the k-th value resolved to the earliest training rows
        kth = np.partition(key, k - 1, axis=0)[k - 1]
        better = key < kth
        tied = key == kth
        room = k - better.sum(axis=0)
        chosen = better | (tied & (np.cumsum(tied, axis=0) <= room))
        cand = np.nonzero(chosen.T)[1].reshape(key.shape[1], k).T
        order = np.lexsort((cand, np.take_along_axis(key, cand, axis=0)), axis=0)
        idx = np.take_along_axis(cand, order, axis=0)
    else:
        idx = np.argsort(key, axis=0, kind="stable")
    return idx, np.take_along_axis(pairwise, idx, axis=0)


SUMMARY_BLOCK_BYTES = 64 * 2**20  # memory budget of one row block of the streaming pass
_BLOCK_TEMPORARIES = 10  # float64-sized [rows, n_query] temporaries a block needs at once


def summary_block_rows(n_query: int, budget: int = SUMMARY_BLOCK_BYTES) -> int:
    """Training rows per block so that a block's temporaries (about ten float64 copies of
    [rows, n_query]: keys, selections, cosines) stay within ``budget`` bytes (64 MiB: about
    8,000 rows at 100 queries); at least 1."""
    return max(1, budget // (8 * _BLOCK_TEMPORARIES * max(n_query, 1)))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A [n_train, n_query] score matrix as numpy *without copying it* when it is already a
    float array (float32 stays float32, a memory map stays mapped); else float64."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    if not (isinstance(x, np.ndarray) and x.dtype.kind == "f"):
        return _as_float(x, name, 2)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n_train, n_query], got shape {x.shape}")
    return x


@dataclass
class _Scan:
    """What one streaming pass over the score matrix finds: the k highest (proponents) and
    lowest (opponents) scores of each query with their rows, each query's most aligned row for
    the leak rule (its cosine and plain-mode score), and the count of non-finite scores."""

    pro_idx: np.ndarray
    pro_val: np.ndarray
    opp_idx: np.ndarray
    opp_val: np.ndarray
    has: np.ndarray
    best_idx: np.ndarray
    best_cos: np.ndarray
    best_score: np.ndarray
    n_nonfinite: int


def _merge_top(
    run: tuple[np.ndarray, np.ndarray] | None,
    block: tuple[np.ndarray, np.ndarray],
    k: int,
    largest: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best (row, score) per query of the running best and a later block's best: ordered
    by score (non-finite last), ties by training row, exactly as a sort of all rows would be."""
    if run is None:
        return block
    idx = np.concatenate([run[0], block[0]])
    val = np.concatenate([run[1], block[1]])
    key = np.where(np.isfinite(val), -val if largest else val, np.inf)
    order = np.lexsort((idx, key), axis=0)[:k]
    return np.take_along_axis(idx, order, axis=0), np.take_along_axis(val, order, axis=0)


def _scan(
    scores: np.ndarray,
    leak_scores: np.ndarray,
    s_inf: np.ndarray,
    drop: np.ndarray,
    k: int,
    block_rows: int | None,
) -> _Scan:
    """One pass over ``scores`` (and ``leak_scores``) in row blocks, each widened to float64
    on its own: top-k per query, the leak rule's best cosine per query, non-finite count.
    Equal to the whole-matrix computation bit for bit (the same element-wise float64
    operations; selections and maxima do not depend on the order of the rows seen)."""
    n_train, n_query = scores.shape
    step = block_rows or summary_block_rows(n_query)
    cols = np.arange(n_query)
    pro = opp = None
    has = np.zeros(n_query, dtype=bool)
    best_idx = np.zeros(n_query, dtype=np.int64)
    best_cos = np.full(n_query, -np.inf)
    best_score = np.full(n_query, np.nan)
    nonfinite = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pos_drop = np.where(drop > 0, drop, np.nan)
        for start in range(0, n_train, step):
            stop = min(start + step, n_train)
            block = np.asarray(scores[start:stop], dtype=np.float64)
            nonfinite += int((~np.isfinite(block)).sum())
            kb = min(k, stop - start)
            for largest in (True, False):
                idx, val = _top_k(block, kb, largest=largest)
                merged = _merge_top(pro if largest else opp, (idx + start, val), k, largest)
                pro, opp = (merged, opp) if largest else (pro, merged)
            leak = block if leak_scores is scores else np.asarray(
                leak_scores[start:stop], dtype=np.float64
            )  # fmt: skip
            s_blk = np.where(s_inf[start:stop] > 0, s_inf[start:stop], np.nan)
            cos = leak / np.sqrt(s_blk[:, None] * pos_drop)  # NaN where undefined
            finite = np.isfinite(cos)
            has |= finite.any(axis=0)
            masked = np.where(finite, cos, -np.inf)
            at = masked.argmax(axis=0) if n_query else np.zeros(0, dtype=np.int64)
            top = masked[at, cols]
            better = top > best_cos  # strict: the first row of the maximum wins, as argmax
            best_idx[better] = at[better] + start
            best_cos[better] = top[better]
            best_score[better] = leak[at[better], cols[better]]
    assert pro is not None and opp is not None
    return _Scan(*pro, *opp, has, best_idx, best_cos, best_score, nonfinite)


def _nan_filled(array: np.ndarray) -> np.ndarray:
    array.fill(np.nan)
    return array


def _loss_after(
    loss_after_fit: Any, calib_loss_after_fit: Any, n_train: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(training rows', calibration rows' loss after the validation fit), checked; the second
    is None unless both are given and it has a finite value (then the harmful rule uses them)."""
    after = None if loss_after_fit is None else _as_float(loss_after_fit, "loss_after_fit", 1)
    if after is not None and len(after) != n_train:
        raise ValueError(
            f"loss_after_fit has length {len(after)} but pairwise has n_train = {n_train}"
        )
    cal = (
        None
        if calib_loss_after_fit is None
        else _as_float(calib_loss_after_fit, "calib_loss_after_fit", 1)
    )
    if after is None or cal is None or not np.isfinite(cal).any():
        return after, None
    return after, cal


def summarise(
    pairwise: Any,
    self_inf: Any,
    group_inf: Any,
    *,
    train_ids: Any = None,
    train_labels: Any = None,
    query_ids: Any = None,
    query_self_drop: Any,
    thresholds: GateThresholds | None = None,
    calib_self_inf: Any = None,
    calib_group_inf: Any = None,
    leak_pairwise: Any = None,
    loss_after_fit: Any = None,
    calib_loss_after_fit: Any = None,
    train_x: Any = None,
    query_x: Any = None,
    block_rows: int | None = None,
    column: Callable[[int], np.ndarray] | None = None,
) -> InfluenceTables:
    """Build the training, query and leak tables from the engine's score arrays.

    Flags (module docstring): with calibration scores, suspected mislabel when
    ``self_influence > T(calib_self_inf, mislabel_alpha)`` and harmful when
    ``group_influence < 0`` and ``loss_after_fit > T(calib_loss_after_fit, harmful_alpha)``
    (else ``-group_influence > T(-calib_group_inf, harmful_alpha)``; conformal thresholds:
    about alpha false flags on clean data, fewer in practice). Each flag
    without its calibration scores (None, or no finite value) falls back to the uncalibrated
    robust-z rule (``self_z > mislabel_z``; ``group_influence < 0`` and ``group_z < -harmful_z``)
    and logs a warning: on real engine scores that fallback flags a large share of clean data.
    Leak rule: a query's most aligned training example is a suspected leak when
    ``score / sqrt(self_influence * query_self_drop) >= leak_cosine`` (the gradient cosine;
    an exact duplicate has 1.0; scale-free, so it holds whatever the step size).

    Args:
        pairwise: [n_train, n_query] scores, positive = proponent (n_query may be 0).
        self_inf: [n_train] self-influence.
        group_inf: [n_train] influence on the validation set (negative = harmful).
        train_ids, train_labels: [n_train] ids (default 0..n-1) and labels (default -1).
        query_ids: [n_query] ids (default 0..n-1).
        query_self_drop: [n_query] each query's score against itself under its own update.
        thresholds: flag and gate thresholds; defaults when None.
        calib_self_inf: [m] self-influence of clean held-out examples (normally the validation
            set), same engine and settings as ``self_inf``; any length; non-finite values are
            dropped. None = fallback rule.
        calib_group_inf: [m'] group influence of each clean held-out example on the same clean
            set *excluding itself* (e.g. 5-fold over the validation set: each fold scored
            against the other folds), same engine settings as ``group_inf``. None = fallback.
        loss_after_fit: [n_train] each training example's loss after the group fit that gave
            ``group_inf``; with ``calib_loss_after_fit`` ([m''] each calibration example's loss
            after the fit on the other folds) the harmful flag thresholds it (module doc).
            Either None (or no finite calibration loss): the ``calib_group_inf`` threshold.
        leak_pairwise: [n_train, n_query] plain-mode pairwise scores for the leak rule, whose
            cosine needs the per-unit-lr scale of ``self_inf`` and ``query_self_drop``; pass it
            when ``pairwise`` comes from another mode (anchored). None = ``pairwise``.
        train_x, query_x: the inputs (any shape with a leading example axis). When given, a
            leak must also be a near-copy in input space (``leak_input_distance``).
        block_rows: training rows per block of the one streaming pass over ``pairwise`` (and
            ``leak_pairwise``); None = :func:`summary_block_rows` (a memory budget). Any value
            gives the same tables.
        column: makes each float64 column of the training table the call computes (the
            robust z-scores; NaN loss after fit when none is given) from its length, e.g.
            :func:`mirrorinf.io.scratch_array` (file-backed, not the process's own memory);
            None = in memory. Any choice gives the same tables.

    Memory: the training table is built once from its column arrays, without a copy (inputs
    that are already float64 / int64 are shared with it, so do not change them afterwards);
    besides its columns the call needs a few [n_train] float64 temporaries and the row blocks.

    Raises:
        ValueError: an input has the wrong shape or sizes disagree, naming the input.
    """
    th = thresholds if thresholds is not None else GateThresholds()
    scores = _as_matrix(pairwise, "pairwise")
    leak_scores = scores if leak_pairwise is None else _as_matrix(leak_pairwise, "leak_pairwise")
    if leak_scores.shape != scores.shape:
        raise ValueError(
            f"leak_pairwise has shape {leak_scores.shape} but pairwise has {scores.shape}"
        )
    n_train, n_query = scores.shape
    if n_train == 0:
        raise ValueError("pairwise has no rows: at least one training example is needed")
    s_inf = _as_float(self_inf, "self_inf", 1)
    g_inf = _as_float(group_inf, "group_inf", 1)
    drop = _as_float(query_self_drop, "query_self_drop", 1)
    for name, arr, n, what in (
        ("self_inf", s_inf, n_train, "n_train"),
        ("group_inf", g_inf, n_train, "n_train"),
        ("query_self_drop", drop, n_query, "n_query"),
    ):
        if len(arr) != n:
            raise ValueError(
                f"{name} has length {len(arr)} but pairwise has {what} = {n} "
                f"(pairwise shape {scores.shape})"
            )
    t_ids = _as_ids(train_ids, n_train, "train_ids")
    labels = (
        np.full(n_train, -1, dtype=np.int64)
        if train_labels is None
        else _as_ids(train_labels, n_train, "train_labels")
    )
    q_ids = _as_ids(query_ids, n_query, "query_ids")

    new_column = column or (lambda n: np.empty(n))
    self_z = robust_z(s_inf, new_column(n_train))
    group_z = robust_z(g_inf, new_column(n_train))
    cal_self = None if calib_self_inf is None else _as_float(calib_self_inf, "calib_self_inf", 1)
    cal_group = (
        None if calib_group_inf is None else _as_float(calib_group_inf, "calib_group_inf", 1)
    )
    after, cal_after = _loss_after(loss_after_fit, calib_loss_after_fit, n_train)
    mis_thr, mis_alpha, n_cal_self = (
        conformal_threshold(cal_self, th.mislabel_alpha)
        if cal_self is not None
        else (float("nan"), float("nan"), 0)
    )
    harm_thr, harm_alpha, n_cal_group = (
        conformal_threshold(-cal_group, th.harmful_alpha)
        if cal_group is not None and cal_after is None
        else (float("nan"), float("nan"), 0)
    )
    loss_thr, loss_alpha, n_cal_loss = (
        conformal_threshold(cal_after, th.harmful_alpha)
        if cal_after is not None
        else (float("nan"), float("nan"), 0)
    )
    if n_cal_loss:  # the loss-after-fit rule replaces the group-influence threshold
        harm_alpha, n_cal_group = loss_alpha, n_cal_loss
    exp_thr, exp_tail, max_exposed, n_exposed = float("nan"), float("nan"), 1.0, 0
    if n_cal_loss:
        assert after is not None and cal_after is not None
        exp_thr, exp_tail, _ = conformal_threshold(cal_after, 1 - th.exposed_quantile)
        with np.errstate(invalid="ignore"):
            n_exposed = int(np.count_nonzero(exposed_rows(g_inf, after, exp_thr)))
        max_exposed = max_exposed_fraction(exp_tail, n_cal_loss, n_train, th.max_harmful_fraction)
    with np.errstate(invalid="ignore"):
        # NaN compares False: a non-finite score is never flagged
        flag_mislabel = s_inf > mis_thr if n_cal_self else self_z > th.mislabel_z
        if n_cal_loss:
            assert after is not None
            flag_harmful = (g_inf < 0) & (after > loss_thr)
        elif n_cal_group:
            flag_harmful = (g_inf < 0) & (-g_inf > harm_thr)
            harm_thr = -harm_thr  # reported on the group-influence scale: flagged below it
        else:
            flag_harmful = (g_inf < 0) & (group_z < -th.harmful_z)
        if n_cal_self and n_cal_group:
            atypical = np.quantile(cal_self[np.isfinite(cal_self)], th.harmful_atypical_quantile)
            flag_mislabel = flag_mislabel | (flag_harmful & (s_inf > atypical))
    for flag, n_cal, alpha_eff, alpha, arg in (
        ("mislabel", n_cal_self, mis_alpha, th.mislabel_alpha, "calib_self_inf"),
        ("harmful", n_cal_group, harm_alpha, th.harmful_alpha, "calib_group_inf"),
    ):
        if not n_cal:
            logger.warning(
                "%s flag: no finite %s, using the uncalibrated robust-z fallback (on real "
                "engine scores it flags a large share of clean data)",
                flag,
                arg,
            )
        elif alpha_eff > alpha + 1e-12:
            logger.warning(
                "%s flag: %d calibration scores cannot certify alpha=%g; threshold = their "
                "maximum, alpha_eff=%.3g (use >= %d calibration examples)",
                flag,
                n_cal,
                alpha,
                alpha_eff,
                math.ceil(1 / alpha - 1),
            )
    train = pd.DataFrame(
        {
            "id": t_ids,
            "label": labels,
            "self_influence": s_inf,
            "self_z": self_z,
            "group_influence": g_inf,
            "group_z": group_z,
            "loss_after_fit": _nan_filled(new_column(n_train)) if after is None else after,
            "flag_mislabel": flag_mislabel,
            "flag_harmful": flag_harmful,
        },
        copy=False,  # no second copy of the table (float64 / int64 inputs are shared)
    )

    k = min(th.top_k, n_train)
    scan = _scan(scores, leak_scores, s_inf, drop, k, block_rows)
    pro_idx, pro_val, opp_idx, opp_val = scan.pro_idx, scan.pro_val, scan.opp_idx, scan.opp_val
    idx = np.concatenate([pro_idx, opp_idx]).T.ravel()  # query-major: k proponents, k opponents
    queries = pd.DataFrame(
        {
            "query_id": np.repeat(q_ids, 2 * k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), 2 * n_query),
            "kind": np.tile(np.repeat(np.array(["proponent", "opponent"]), k), n_query),
            "train_id": t_ids[idx],
            "score": np.concatenate([pro_val, opp_val]).T.ravel(),
        }
    )

    has, best_idx = scan.has, scan.best_idx
    best_cos = np.where(has, scan.best_cos, np.nan)
    is_leak = np.isfinite(best_cos) & (best_cos >= th.leak_cosine)
    distance = np.full(n_query, np.nan)
    if train_x is not None and query_x is not None and n_query:
        distance = input_distance(train_x, query_x, best_idx)
        is_leak &= distance <= th.leak_input_distance
    leaks = pd.DataFrame(
        {
            "query_id": q_ids[is_leak],
            "train_id": t_ids[best_idx[is_leak]],
            "score": scan.best_score[is_leak],
            "cosine": best_cos[is_leak],
            "input_distance": distance[is_leak],
        }
    )

    n_flag, n_harm, n_leak = int(flag_mislabel.sum()), int(flag_harmful.sum()), int(is_leak.sum())
    counts: dict[str, int | float] = {
        "n_train": int(n_train),
        "n_query": int(n_query),
        "n_flagged_mislabel": n_flag,
        "flagged_fraction": n_flag / n_train,
        "n_harmful": n_harm,
        "harmful_fraction": n_harm / n_train,
        "n_leaks": n_leak,
        "n_nonfinite_self": int((~np.isfinite(s_inf)).sum()),
        "n_nonfinite_group": int((~np.isfinite(g_inf)).sum()),
        "n_nonfinite_pairwise": scan.n_nonfinite,
        "n_query_nonpositive_self_drop": int((~(drop > 0)).sum()),
        "mislabel_calibrated": int(n_cal_self > 0),
        "n_calib_self": int(n_cal_self),
        "mislabel_threshold": float(mis_thr),
        "mislabel_alpha_eff": float(mis_alpha),
        "harmful_calibrated": int(n_cal_group > 0),
        "n_calib_group": int(n_cal_group),
        # on the loss-after-fit scale when harmful_by_loss_after_fit, else group influence
        "harmful_threshold": float(loss_thr if n_cal_loss else harm_thr),
        "harmful_alpha_eff": float(harm_alpha),
        "harmful_by_loss_after_fit": int(n_cal_loss > 0),
        # harmful_excess (gate): rows above the calibration's exposed_quantile, and the limit
        "n_exposed": n_exposed,
        "exposed_fraction": n_exposed / n_train,
        "exposed_threshold": exp_thr,
        "exposed_tail": exp_tail,
        "max_exposed_fraction": max_exposed,
    }
    if counts["n_query_nonpositive_self_drop"]:
        logger.warning(
            "%d of %d queries have a self-drop <= 0 or non-finite; the leak rule skips them",
            counts["n_query_nonpositive_self_drop"],
            n_query,
        )
    logger.debug("influence summary: %s", counts)
    return InfluenceTables(train=train, queries=queries, leaks=leaks, counts=counts)
