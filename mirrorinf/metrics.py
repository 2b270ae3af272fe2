"""Quality metrics for influence scores (numpy only; no scipy needed).

All metrics follow the product's sign convention: **positive score = proponent** (training on the
query lowers the training point's loss, and removing the training point raises the query's loss).

- :func:`loo_correlation` compares scores with exact leave-one-out (LOO) influence, the ground
  truth for convex models.
- :func:`lds` is the linear datamodeling score: how well summed scores over a random training
  subset predict the loss of a model retrained on that subset (the standard check for non-convex
  models, where exact LOO is too noisy to be a useful target).
- :func:`mislabel_auroc` and :func:`precision_at_k` measure how well a per-example score ranks
  deliberately flipped labels first.

Inputs may be numpy arrays, torch tensors (moved to CPU and converted), or nested sequences.
Computation is in float64. Shape mismatches raise ``ValueError`` naming the offending inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "lds",
    "loo_correlation",
    "mislabel_auroc",
    "pearson",
    "precision_at_k",
    "rankdata",
    "spearman",
]


def _as_array(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Convert numpy / torch / sequence input to a numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} could not be converted to a {np.dtype(dtype).name} array: {exc}"
        ) from exc
    return arr


def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = _as_array(x, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    return arr


def rankdata(x: Any, axis: int = 0) -> np.ndarray:
    """Ranks (1-based, float64) along ``axis`` with ties given their average rank.

    Matches ``scipy.stats.rankdata(x, method="average", axis=axis)``.
    """
    a = np.moveaxis(_as_array(x, "x"), axis, -1)
    flat = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    out = np.empty_like(flat, dtype=np.float64)
    n = flat.shape[1]
    for r in range(flat.shape[0]):
        row = flat[r]
        order = np.argsort(row, kind="mergesort")
        srt = row[order]
        # Start index of each run of equal values in the sorted row.
        new = np.ones(n, dtype=bool)
        new[1:] = srt[1:] != srt[:-1]
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], n)  # exclusive
        avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
        run_id = np.cumsum(new) - 1
        out[r, order] = avg[run_id]
    return np.moveaxis(out.reshape(a.shape), -1, axis)


def _column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of two [n, m] arrays; NaN where undefined."""
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r[~(denom > 0) | ~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _nonconstant(x: np.ndarray) -> np.ndarray:
    """Columns of a 2-D array whose values are not all equal (and all finite)."""
    return np.all(np.isfinite(x), axis=0) & (np.ptp(x, axis=0) > 0)


def pearson(a: Any, b: Any) -> np.ndarray:
    """Per-column Pearson correlation of two arrays of the same shape ([n] or [n, m]).

    Returns NaN for a column where either input is constant or non-finite.
    """
    x, y = _check_pair(a, b, "a", "b")
    r = _column_pearson(x, y)
    r[~(_nonconstant(x) & _nonconstant(y))] = np.nan
    return r


def spearman(a: Any, b: Any) -> np.ndarray:
    """Per-column Spearman correlation (Pearson of average-tie ranks) of two same-shape arrays.

    Returns NaN for a column where either input is constant or non-finite.
    """
    x, y = _check_pair(a, b, "a", "b")
    ok = _nonconstant(x) & _nonconstant(y)
    r = _column_pearson(rankdata(x, axis=0), rankdata(y, axis=0))
    r[~ok] = np.nan
    return r


def _check_pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_2d(a, name_a), _as_2d(b, name_b)
    if x.shape != y.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {x.shape} but {name_b} has shape {y.shape}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name_a} needs at least 2 rows to correlate, got shape {x.shape}")
    return x, y


def _nanmean_or_nan(r: np.ndarray) -> float:
    r = r[np.isfinite(r)]
    return float(r.mean()) if r.size else float("nan")


def loo_correlation(scores: Any, loo: Any) -> dict[str, float]:
    """Mean per-query Spearman and Pearson between predicted scores and exact LOO influence.

    Args:
        scores: predicted influence, shape [n_train, n_query] (or [n_train] for one query);
            positive = proponent.
        loo: ground-truth leave-one-out influence of the same shape,
            ``loo[i, j] = L(A(D minus z_i), q_j) - L(A(D), q_j)`` (same sign convention: removing a
            proponent raises the query's loss).

    Returns:
        ``{"spearman": ..., "pearson": ..., "n_queries": ..., "n_skipped": ...}``: each correlation
        is computed per query (column) across training points, then averaged over queries.
        A query whose predicted or true column is constant (or contains NaN/inf) has no defined
        correlation; it is skipped and counted in ``n_skipped`` rather than counted as 0 or
        poisoning the mean. If every query is skipped the correlations are NaN.

    Why per query: practitioners rank training points for one query at a time, and different
    queries have very different influence scales, which would dominate a pooled correlation.
    """
    x, y = _check_pair(scores, loo, "scores", "loo")
    sp = spearman(x, y)
    pe = pearson(x, y)
    skipped = ~np.isfinite(sp)
    return {
        "spearman": _nanmean_or_nan(sp),
        "pearson": _nanmean_or_nan(pe),
        "n_queries": int(x.shape[1]),
        "n_skipped": int(skipped.sum()),
    }


def lds(scores: Any, masks: Any, subset_losses: Any) -> float:
    """Linear datamodeling score (LDS): do summed scores predict retrained-on-subset losses?

    Args:
        scores: influence scores, shape [n_train, n_query] (or [n_train]); positive = proponent.
        masks: boolean membership, shape [n_subsets, n_train]; ``masks[s, i]`` is True when
            training point i was in subset s.
        subset_losses: shape [n_subsets, n_query] (or [n_subsets]); loss on each query of the model
            retrained on subset s.

    Returns:
        Mean over queries of the Spearman correlation, across subsets, between the predicted
        ``sum(scores[i, j] for i in S_s)`` and ``-subset_losses[s, j]``. Proponents lower a query's
        loss, so a subset with more proponents should have a *lower* loss: the correlation is with
        the negative loss. Queries where either side is constant across subsets are skipped (NaN
        guard); NaN if all are.
    """
    s = _as_2d(scores, "scores")
    m = _as_array(masks, "masks", dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"masks must be 2-D [n_subsets, n_train], got shape {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("masks must be boolean (0/1) membership of training points in subsets")
    losses = _as_2d(subset_losses, "subset_losses")
    if m.shape[1] != s.shape[0]:
        raise ValueError(
            f"shape mismatch: masks has {m.shape[1]} columns (training points) but scores has "
            f"{s.shape[0]} rows (training points); masks {m.shape}, scores {s.shape}"
        )
    if losses.shape != (m.shape[0], s.shape[1]):
        raise ValueError(
            f"shape mismatch: subset_losses has shape {losses.shape}, expected "
            f"(n_subsets, n_query) = {(m.shape[0], s.shape[1])} from masks {m.shape} and "
            f"scores {s.shape}"
        )
    pred = m @ s  # [n_subsets, n_query]
    return _nanmean_or_nan(spearman(pred, -losses))


def _check_flags(scores: Any, is_flipped: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_array(scores, "scores")
    f = np.asarray(
        is_flipped.detach().cpu().numpy() if hasattr(is_flipped, "detach") else is_flipped
    )
    if s.ndim != 1 or f.ndim != 1:
        raise ValueError(f"scores and is_flipped must be 1-D, got shapes {s.shape} and {f.shape}")
    if s.shape != f.shape:
        raise ValueError(
            f"shape mismatch: scores has shape {s.shape} but is_flipped has shape {f.shape}"
        )
    if not np.all((f == 0) | (f == 1)):
        raise ValueError("is_flipped must be boolean (0/1)")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
    return s, f.astype(bool)


def mislabel_auroc(scores: Any, is_flipped: Any) -> float:
    """Area under the ROC curve for ranking flipped labels first (higher score = more suspicious).

    Equals the probability that a random flipped example scores above a random clean one, ties
    counting one half (Mann-Whitney U / (n_pos * n_neg), via average-tie ranks). 0.5 = chance.
    Raises ValueError when there are no flipped or no clean examples (AUROC undefined).
    """
    s, f = _check_flags(scores, is_flipped)
    n_pos, n_neg = int(f.sum()), int((~f).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both flipped and clean examples, got {n_pos} flipped and {n_neg} clean"
        )
    ranks = rankdata(s)
    u = ranks[f].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_at_k(scores: Any, is_flipped: Any, k: int | None = None) -> float:
    """Fraction of flipped labels among the k highest-scoring examples.

    ``k`` defaults to the number of flipped examples (then precision = recall at k, the natural
    "inspect as many as there are errors" budget). Ties at the cut-off are broken by a stable
    sort on the original order (deterministic).
    """
    s, f = _check_flags(scores, is_flipped)
    if k is None:
        k = int(f.sum())
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= s.size:
        raise ValueError(f"k must be an integer in 1..{s.size}, got {k!r}")
    top = np.argsort(-s, kind="stable")[:k]
    return float(f[top].mean())
