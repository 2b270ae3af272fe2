"""The analysis recipe: every per-training-row score the review needs, from one engine.

Pairwise influence on the queries (plus the plain-mode leak twin when the engine runs in another
mode), group influence on a validation set and self-influence. Pure engine use: no tools, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mirrorinf.engine import DataLike, ForwardInf, Inputs, ScoreSink, as_examples

# (array name, shape) -> where that score matrix is written (e.g. a file in the run's store)
SinkFactory = Callable[[str, tuple[int, int]], ScoreSink]


def as_score_array(scores: torch.Tensor) -> np.ndarray:
    """A pairwise score tensor as numpy in the engine's own float dtype (float32 by default):
    the [n_train, n_query] matrix is the largest thing the flow holds, and a float64 copy of it
    would double that with no gain (every summary widens one row block at a time)."""
    return scores.detach().cpu().numpy()


def score_rows(
    fi: ForwardInf,
    train: DataLike,
    queries: tuple[Inputs, torch.Tensor],
    val: DataLike,
    curvature: DataLike | None = None,
    out: SinkFactory | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every per-training-row score of a set of rows (plus the per-query self-drop), and the
    engine's report of each verb.

    ``curvature``: the whole training set when ``train`` is a shard of it, so that anchored
    mode's curvature (and so every score) is the unsharded run's; None = ``train``.

    ``pairwise`` and ``leak_pairwise`` keep the engine's dtype (:func:`as_score_array`); the
    per-row arrays are float64. ``leak_pairwise`` is the plain-mode pairwise pass the leak rule
    needs when the engine runs in another mode (absent in plain mode, where ``pairwise``
    serves). ``out``: where to write those two matrices instead (the engine fills the sink
    block by block, never holding the matrix; the sink is returned in their place).
    ``loss_after_fit``: each row's loss after the group fit on ``val`` (the harmful flag's
    score).
    """
    train = as_examples(train, "training set")  # validated once; its length sizes the sinks
    reports: dict[str, dict[str, Any]] = {}

    def report(name: str) -> None:
        assert fi.last_report is not None
        rep = fi.last_report.to_dict()
        rep.pop("query_self_drop", None)  # an array, kept with the scores
        reports[name] = rep

    n_q = len(queries[1])

    def pairwise(engine: ForwardInf, name: str, curv: Any = None) -> Any:
        if out is None:
            return as_score_array(engine.pairwise(train, queries, curvature=curv))
        sink = out(name, (len(train), n_q))
        engine.pairwise_into(train, queries, sink, curvature=curv)
        return sink

    rows: dict[str, Any] = {"pairwise": pairwise(fi, "pairwise", curvature)}
    assert fi.last_report is not None
    drop = fi.last_report.query_self_drop
    plain = fi.last_report.mode == "plain"
    report("pairwise")
    if not plain:
        twin = fi.plain_twin()
        rows["leak_pairwise"] = pairwise(twin, "leak_pairwise")
        assert twin.last_report is not None
        drop = twin.last_report.query_self_drop
    rows["query_self_drop"] = drop.double().numpy() if drop is not None else np.full(n_q, np.nan)
    rows["group_influence"] = fi.group(train, val, curvature=curvature).double().numpy()
    assert fi.last_report is not None
    if fi.last_report.loss_after_fit is not None:  # the harmful flag's score (summary.py)
        rows["loss_after_fit"] = fi.last_report.loss_after_fit.double().numpy()
    report("group")
    rows["self_influence"] = fi.self_influence(train).double().numpy()
    report("self")
    return rows, reports
