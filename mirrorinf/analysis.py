"""The analysis recipe: every per-training-row score the review needs, from one engine.

Pairwise influence on the queries (plus the plain-mode leak twin when the engine runs in another
mode), group influence on a validation set and self-influence. Pure engine use: no tools, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mirrorinf.engine import ForwardInf, Inputs


def as_score_array(scores: torch.Tensor) -> np.ndarray:
    """A pairwise score tensor as numpy in the engine's own float dtype (float32 by default):
    the [n_train, n_query] matrix is the largest thing the flow holds, and a float64 copy of it
    would double that with no gain (every summary widens one row block at a time)."""
    return scores.detach().cpu().numpy()


def score_rows(
    fi: ForwardInf,
    train: tuple[Inputs, torch.Tensor],
    queries: tuple[Inputs, torch.Tensor],
    val: tuple[Inputs, torch.Tensor],
    curvature: tuple[Inputs, torch.Tensor] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Every per-training-row score of a set of rows (plus the per-query self-drop), and the
    engine's report of each verb.

    ``curvature``: the whole training set when ``train`` is a shard of it, so that anchored
    mode's curvature (and so every score) is the unsharded run's; None = ``train``.

    ``pairwise`` and ``leak_pairwise`` keep the engine's dtype (:func:`as_score_array`); the
    per-row arrays are float64. ``leak_pairwise`` is the plain-mode pairwise pass the leak rule
    needs when the engine runs in another mode (absent in plain mode, where ``pairwise``
    serves). ``loss_after_fit``: each row's loss after the group fit on ``val`` (the harmful
    flag's score).
    """
    reports: dict[str, dict[str, Any]] = {}

    def report(name: str) -> None:
        assert fi.last_report is not None
        rep = fi.last_report.to_dict()
        rep.pop("query_self_drop", None)  # an array, kept with the scores
        reports[name] = rep

    out = {"pairwise": as_score_array(fi.pairwise(train, queries, curvature=curvature))}
    assert fi.last_report is not None
    drop = fi.last_report.query_self_drop
    plain = fi.last_report.mode == "plain"
    report("pairwise")
    if not plain:
        twin = fi.plain_twin()
        out["leak_pairwise"] = as_score_array(twin.pairwise(train, queries))
        assert twin.last_report is not None
        drop = twin.last_report.query_self_drop
    n_q = len(queries[1])
    out["query_self_drop"] = drop.double().numpy() if drop is not None else np.full(n_q, np.nan)
    out["group_influence"] = fi.group(train, val, curvature=curvature).double().numpy()
    assert fi.last_report is not None
    if fi.last_report.loss_after_fit is not None:  # the harmful flag's score (summary.py)
        out["loss_after_fit"] = fi.last_report.loss_after_fit.double().numpy()
    report("group")
    out["self_influence"] = fi.self_influence(train).double().numpy()
    report("self")
    return out, reports
