"""Review inputs shared by the review tests (test_review, test_hf_model): random scores for 60
training rows and 6 queries summarised by the real ``summarise``, with planted leaks."""

from __future__ import annotations

from typing import Any

import numpy as np

from mirrorinf.review import ReviewInputs
from mirrorinf.summary import summarise

CHECKS = [
    {"check": "mislabel_fraction", "success": False, "observed": 0.1, "threshold": 0.05},
    {"check": "leaks", "success": True, "observed": 0, "threshold": 0},
]


def review_inputs(n_features: int, n_leaks: int = 1, seed: int = 0, **losses: Any) -> ReviewInputs:
    """Inputs with ``n_features`` per row; query q < ``n_leaks`` copies training row q."""
    rng = np.random.default_rng(seed)
    n_train, n_query = 60, 6
    x = rng.normal(size=(n_train, n_features))
    self_inf = np.exp(rng.normal(-6, 2, size=n_train))
    group = rng.normal(0, 1e-3, size=n_train)
    pairwise = rng.normal(0, 1e-8, size=(n_train, n_query))
    drop = np.full(n_query, 1e-3)
    for q in range(n_leaks):  # query q duplicates training row q: cosine 1
        pairwise[q, q] = np.sqrt(self_inf[q] * drop[q])
    tables = summarise(
        pairwise, self_inf, group, train_labels=rng.integers(0, 3, n_train),
        query_ids=np.arange(100, 100 + n_query), query_self_drop=drop,
        calib_self_inf=np.exp(rng.normal(-7, 1, size=200)),
        calib_group_inf=rng.normal(0, 3e-4, size=200), **losses,
    )  # fmt: skip
    return ReviewInputs(
        tables=tables,
        train_x=x,
        query_x=np.concatenate([x[:n_leaks], rng.normal(size=(n_query - n_leaks, n_features))]),
        query_ids=np.arange(100, 100 + n_query),
        query_labels=rng.integers(0, 3, n_query),
        train_pred=rng.integers(0, 3, n_train),
        checks=CHECKS,
        verdict="failed",
        reasons=["mislabel_fraction: observed 0.1, allowed 0.05"],
    )
