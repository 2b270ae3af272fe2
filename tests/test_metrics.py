"""Metrics on cases whose answers are known by hand, plus input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mirrorinf.metrics import (
    lds,
    loo_correlation,
    mislabel_auroc,
    pearson,
    precision_at_k,
    rankdata,
    spearman,
)

# ---------------------------------------------------------------- ranks and correlations


def test_rankdata_average_ties():
    # sorted: 1, 2, 2, 3, 3, 3 -> ranks 1, 2.5, 2.5, 5, 5, 5
    x = np.array([3, 2, 1, 3, 2, 3])
    np.testing.assert_allclose(rankdata(x), [5, 2.5, 1, 5, 2.5, 5])


def test_rankdata_along_axis_matches_columns():
    x = np.array([[3.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    np.testing.assert_allclose(rankdata(x, axis=0), [[3, 2.5], [1, 2.5], [2, 1]])


def test_rankdata_matches_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(40, 3)).astype(float)  # many ties
    np.testing.assert_allclose(rankdata(x, axis=0), stats.rankdata(x, axis=0))
    y = rng.normal(size=(40, 3))
    for j in range(3):
        ref = stats.spearmanr(x[:, j], y[:, j]).statistic
        assert spearman(x[:, j], y[:, j])[0] == pytest.approx(ref, abs=1e-12)


def test_spearman_with_ties_by_hand():
    # x ranks: 1, 2.5, 2.5, 4 ; y ranks: 1, 2, 3, 4.
    # centered: x -1.5, 0, 0, 1.5 ; y -1.5, -.5, .5, 1.5 -> cov 4.5, |x| sqrt(4.5), |y| sqrt(5)
    x = [1.0, 2.0, 2.0, 3.0]
    y = [10.0, 20.0, 30.0, 40.0]
    assert spearman(x, y)[0] == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


def test_spearman_is_monotone_invariant_pearson_is_not():
    x = np.arange(1.0, 11.0)
    assert spearman(x, np.exp(x))[0] == pytest.approx(1.0)
    assert pearson(x, np.exp(x))[0] < 0.9


def test_correlation_of_constant_is_nan():
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])
    assert np.isnan(pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])[0])


# ---------------------------------------------------------------- loo_correlation


def test_loo_correlation_perfect_and_reversed():
    rng = np.random.default_rng(1)
    loo = rng.normal(size=(30, 4))
    perfect = loo_correlation(2.0 * loo + 1.0, loo)  # positive affine map
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["pearson"] == pytest.approx(1.0)
    reversed_ = loo_correlation(-loo, loo)
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["pearson"] == pytest.approx(-1.0)
    assert perfect["n_queries"] == 4 and perfect["n_skipped"] == 0


def test_loo_correlation_monotone_not_linear():
    loo = np.arange(1.0, 21.0)[:, None]
    out = loo_correlation(loo**3, loo)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 1.0 - 1e-3


def test_loo_correlation_mean_over_columns():
    loo = np.tile(np.arange(10.0)[:, None], (1, 2))
    scores = np.stack([np.arange(10.0), -np.arange(10.0)], axis=1)  # +1 and -1
    assert loo_correlation(scores, loo)["spearman"] == pytest.approx(0.0)


def test_loo_correlation_skips_constant_columns():
    loo = np.tile(np.arange(10.0)[:, None], (1, 3))
    scores = np.stack([np.arange(10.0), np.zeros(10), np.arange(10.0)], axis=1)
    out = loo_correlation(scores, loo)
    assert out["spearman"] == pytest.approx(1.0)  # the all-zero query is skipped, not counted 0
    assert out["n_skipped"] == 1


def test_loo_correlation_all_constant_is_nan():
    out = loo_correlation(np.zeros((5, 2)), np.ones((5, 2)))
    assert math.isnan(out["spearman"]) and math.isnan(out["pearson"])
    assert out["n_skipped"] == 2


def test_loo_correlation_accepts_torch_and_1d():
    loo = torch.arange(8, dtype=torch.float32)
    assert loo_correlation(loo * 3, loo.numpy())["spearman"] == pytest.approx(1.0)


def test_loo_correlation_shape_mismatch():
    with pytest.raises(ValueError, match=r"shape mismatch.*scores.*\(5, 2\).*loo.*\(5, 3\)"):
        loo_correlation(np.zeros((5, 2)), np.zeros((5, 3)))


# ---------------------------------------------------------------- LDS


def _lds_case(sign: float):
    """Losses exactly linear in membership, with proponents lowering the loss."""
    rng = np.random.default_rng(2)
    n_train, n_query, n_sub = 20, 3, 25
    true = rng.normal(size=(n_train, n_query))
    masks = rng.random((n_sub, n_train)) < 0.5
    losses = 5.0 - masks.astype(float) @ true  # more proponents -> lower loss
    return sign * true, masks, losses


def test_lds_perfect_is_one():
    scores, masks, losses = _lds_case(+1.0)
    assert lds(scores, masks, losses) == pytest.approx(1.0)


def test_lds_reversed_is_minus_one():
    scores, masks, losses = _lds_case(-1.0)
    assert lds(scores, masks, losses) == pytest.approx(-1.0)


def test_lds_by_hand():
    # 2 training points, 3 subsets: {0}, {1}, {0,1}; scores 1 and 2 -> predictions 1, 2, 3.
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    scores = np.array([1.0, 2.0])
    assert lds(scores, masks, np.array([3.0, 2.0, 1.0])) == pytest.approx(1.0)
    # losses 1, 3, 2 -> -loss ranks 3, 1, 2 vs prediction ranks 1, 2, 3 -> rho = -0.5
    assert lds(scores, masks, np.array([1.0, 3.0, 2.0])) == pytest.approx(-0.5)


def test_lds_skips_constant_query():
    scores, masks, losses = _lds_case(+1.0)
    losses[:, 1] = 7.0
    assert lds(scores, masks, losses) == pytest.approx(1.0)


def test_lds_shape_mismatch():
    scores, masks, losses = _lds_case(+1.0)
    with pytest.raises(ValueError, match=r"masks.*scores"):
        lds(scores[:-1], masks, losses)
    with pytest.raises(ValueError, match="subset_losses"):
        lds(scores, masks, losses[:-1])
    with pytest.raises(ValueError, match="masks"):
        lds(scores, masks[0], losses)


# ---------------------------------------------------------------- mislabel detection


def test_auroc_perfect_reversed_and_chance():
    flipped = np.array([0, 0, 1, 0, 1], dtype=bool)
    assert mislabel_auroc([0.1, 0.2, 0.9, 0.3, 0.8], flipped) == 1.0
    assert mislabel_auroc([0.9, 0.8, 0.1, 0.7, 0.2], flipped) == 0.0
    assert mislabel_auroc(np.ones(5), flipped) == 0.5  # all tied


def test_auroc_by_hand():
    # positives score 0.8, 0.4; negatives 0.9, 0.5, 0.4, 0.1.
    # Pairs (pos > neg): 0.8 beats 0.5, 0.4, 0.1 -> 3; 0.4 beats 0.1 -> 1, ties 0.4 -> 0.5.
    # (3 + 1 + 0.5) / (2 * 4) = 0.5625
    scores = [0.8, 0.4, 0.9, 0.5, 0.4, 0.1]
    flipped = [True, True, False, False, False, False]
    assert mislabel_auroc(scores, flipped) == pytest.approx(0.5625)


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    flipped = rng.random(200) < 0.1
    scores = np.round(rng.normal(size=200) + flipped, 1)  # ties included
    assert mislabel_auroc(scores, flipped) == pytest.approx(metrics.roc_auc_score(flipped, scores))


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_auroc([1.0, 2.0], [True, True])


def test_precision_at_k():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2])
    flipped = torch.tensor([True, False, False, True, False])
    assert precision_at_k(scores, flipped) == 0.5  # k = 2: top {0, 2}
    assert precision_at_k(scores, flipped, k=3) == pytest.approx(2 / 3)
    assert precision_at_k(scores, flipped, k=1) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(scores, flipped, k=0)


def test_flag_metrics_shape_mismatch():
    with pytest.raises(ValueError, match=r"shape mismatch.*scores.*\(3,\).*is_flipped.*\(4,\)"):
        mislabel_auroc(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="shape mismatch"):
        precision_at_k(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="1-D"):
        mislabel_auroc(np.zeros((3, 2)), np.zeros((3, 2), dtype=bool))


def test_flag_metrics_reject_nan():
    with pytest.raises(ValueError, match="non-finite"):
        mislabel_auroc([0.1, float("nan")], [True, False])
