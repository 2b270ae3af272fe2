"""Unit tests of mirrorinf.summary on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from mirrorinf.summary import (
    GateThresholds,
    InfluenceTables,
    conformal_threshold,
    robust_z,
    summarise,
)

TRAIN_COLUMNS = [
    "id",
    "label",
    "self_influence",
    "self_z",
    "group_influence",
    "group_z",
    "loss_after_fit",
    "flag_mislabel",
    "flag_harmful",
]


def _clean(n_train: int = 500, n_query: int = 20, seed: int = 0) -> dict:
    """Gaussian scores with no planted structure; self-drops far above any pairwise score."""
    rng = np.random.default_rng(seed)
    return {
        "pairwise": rng.normal(size=(n_train, n_query)),
        "self_inf": 10.0 + rng.normal(size=n_train),  # positive, as self-influence is
        "group_inf": rng.normal(size=n_train),
        "query_self_drop": np.full(n_query, 100.0),
    }


def test_tables_have_documented_columns_and_sizes() -> None:
    inp = _clean(n_train=50, n_query=4)
    ids = np.arange(1000, 1050)
    out = summarise(**inp, train_ids=ids, train_labels=np.arange(50) % 10, query_ids=[7, 8, 9, 10])
    assert isinstance(out, InfluenceTables)
    assert list(out.train.columns) == TRAIN_COLUMNS
    assert list(out.queries.columns) == ["query_id", "rank", "kind", "train_id", "score"]
    assert list(out.leaks.columns) == ["query_id", "train_id", "score", "cosine", "input_distance"]
    assert len(out.train) == 50 and (out.train["id"].to_numpy() == ids).all()
    assert len(out.queries) == 4 * 2 * 10  # top_k=10 proponents + 10 opponents per query
    assert out.counts["n_train"] == 50 and out.counts["n_query"] == 4
    assert all(
        isinstance(v, (int, float)) and not isinstance(v, np.generic) for v in out.counts.values()
    )


def test_top_k_order_matches_scores() -> None:
    inp = _clean(n_train=30, n_query=3)
    out = summarise(**inp, thresholds=GateThresholds(top_k=5))
    p = inp["pairwise"]
    for q in range(3):
        rows = out.queries[out.queries["query_id"] == q]
        pro = rows[rows["kind"] == "proponent"]
        opp = rows[rows["kind"] == "opponent"]
        assert list(pro["rank"]) == [1, 2, 3, 4, 5]
        assert list(pro["train_id"]) == list(np.argsort(-p[:, q])[:5])
        assert list(opp["train_id"]) == list(np.argsort(p[:, q])[:5])
        assert np.allclose(pro["score"], np.sort(p[:, q])[::-1][:5])


def test_top_k_larger_than_train_set_lists_every_example() -> None:
    inp = _clean(n_train=3, n_query=2)
    out = summarise(**inp, thresholds=GateThresholds(top_k=10))
    assert len(out.queries) == 2 * 2 * 3


def test_planted_duplicate_is_a_leak() -> None:
    inp = _clean(n_train=200, n_query=10, seed=1)
    drop = np.full(10, 50.0)
    # exact duplicate of query 3: same gradient, so score = self-influence = self-drop
    inp["pairwise"][17, 3] = drop[3]
    inp["self_inf"][17] = drop[3]
    # near duplicate of query 6: gradient 0.995 aligned, twice the norm
    inp["pairwise"][42, 6] = 0.995 * 2 * drop[6]
    inp["self_inf"][42] = 4 * drop[6]
    # a large-gradient point that out-scores a duplicate but is not aligned (cosine 0.5)
    inp["pairwise"][50, 8] = 2 * drop[8]
    inp["self_inf"][50] = 16 * drop[8]
    inp["query_self_drop"] = drop
    out = summarise(**inp, train_ids=np.arange(200) + 5000, query_ids=np.arange(10) + 90)
    leaks = out.leaks.sort_values("query_id").reset_index(drop=True)
    assert list(leaks["query_id"]) == [93, 96]
    assert list(leaks["train_id"]) == [5017, 5042]
    assert leaks["cosine"].tolist() == pytest.approx([1.0, 0.995])
    assert out.counts["n_leaks"] == 2


def test_leak_rule_is_scale_free() -> None:
    inp = _clean(n_train=100, n_query=5, seed=2)
    inp["query_self_drop"] = np.full(5, 10.0)
    inp["pairwise"][8, 2] = 10.0
    inp["self_inf"][8] = 10.0
    small = dict(
        inp,
        pairwise=inp["pairwise"] * 1e-7,
        self_inf=inp["self_inf"] * 1e-7,
        query_self_drop=inp["query_self_drop"] * 1e-7,
    )
    a = summarise(**inp).leaks
    b = summarise(**small).leaks
    assert list(a["train_id"]) == list(b["train_id"]) == [8]
    assert b["cosine"].tolist() == pytest.approx([1.0])


def test_no_leak_below_cosine_or_without_positive_self_drop() -> None:
    inp = _clean(n_train=100, n_query=3, seed=3)
    inp["query_self_drop"] = np.array([10.0, 0.0, -1.0])
    inp["self_inf"][5:8] = 10.0
    inp["pairwise"][5, 0] = 9.8  # cosine 0.98 < 0.99
    inp["pairwise"][6, 1] = 10.0  # self-drop 0: rule does not apply
    inp["pairwise"][7, 2] = 10.0  # negative self-drop: rule does not apply
    out = summarise(**inp)
    assert out.leaks.empty
    assert out.counts["n_query_nonpositive_self_drop"] == 2


def test_planted_large_self_influence_is_flagged() -> None:
    inp = _clean(n_train=500, seed=4)
    planted = [3, 99, 250]
    inp["self_inf"][planted] = [22.0, 25.0, 40.0]  # baseline 10 + N(0, 1)
    out = summarise(**inp)
    assert set(np.flatnonzero(out.train["flag_mislabel"])) == set(planted)
    assert (out.train.loc[planted, "self_z"] > 3.5).all()
    assert out.counts["n_flagged_mislabel"] == 3
    assert out.counts["flagged_fraction"] == pytest.approx(3 / 500)


def test_planted_harmful_examples_are_flagged_and_helpful_ones_not() -> None:
    inp = _clean(n_train=500, seed=5)
    inp["group_inf"][[10, 20]] = -20.0
    inp["group_inf"][30] = +20.0  # a strong proponent of the validation set is not harmful
    out = summarise(**inp)
    assert set(np.flatnonzero(out.train["flag_harmful"])) == {10, 20}
    assert out.counts["n_harmful"] == 2


@pytest.mark.parametrize("seed", range(5))
def test_clean_gaussian_noise_is_not_flagged_at_default_z(seed: int) -> None:
    out = summarise(**_clean(n_train=1000, seed=seed))
    # P(z > 3.5) for Gaussian noise is 2.3e-4 per side: about 0.2 expected flags per 1000,
    # two orders of magnitude below the default gate of 5%
    assert out.counts["n_flagged_mislabel"] <= 2
    assert out.counts["n_harmful"] <= 2
    assert out.leaks.empty


def test_clean_gaussian_noise_fixed_seed_has_no_flags() -> None:
    out = summarise(**_clean(n_train=1000, seed=3))
    assert out.counts["n_flagged_mislabel"] == 0 and out.counts["n_harmful"] == 0
    assert not out.train[["flag_mislabel", "flag_harmful"]].to_numpy().any()


def test_robust_z_known_values_and_fallbacks() -> None:
    z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1
    assert z.tolist() == pytest.approx([-1.349, -0.6745, 0.0, 0.6745, 65.4265])
    z = robust_z([0.0] * 9 + [5.0])  # MAD 0 -> mean absolute deviation
    assert np.isfinite(z).all() and z[-1] > 3.5 and (z[:-1] == 0).all()
    assert (robust_z([2.0] * 7) == 0).all()
    z = robust_z([1.0, np.nan, np.inf, 2.0, 3.0])
    assert (
        np.isnan(z[1])
        and np.isnan(z[2])
        and z[[0, 3, 4]].tolist() == pytest.approx([-0.6745, 0.0, 0.6745])
    )
    assert np.isnan(robust_z([np.nan, np.nan])).all()


def test_degenerate_inputs_do_not_crash() -> None:
    out = summarise(np.zeros((20, 4)), np.ones(20), np.zeros(20), query_self_drop=np.zeros(4))
    assert not out.train["flag_mislabel"].any() and not out.train["flag_harmful"].any()
    assert (out.train["self_z"] == 0).all()
    assert out.leaks.empty
    nan = summarise(
        np.full((5, 2), np.nan),
        np.full(5, np.nan),
        np.full(5, np.nan),
        query_self_drop=[1.0, 1.0],
    )
    assert nan.counts["n_nonfinite_self"] == 5 and nan.counts["n_nonfinite_pairwise"] == 10
    assert nan.leaks.empty and not nan.train["flag_mislabel"].any()


def test_no_queries() -> None:
    out = summarise(np.zeros((6, 0)), np.arange(6.0), np.arange(6.0), query_self_drop=[])
    assert out.queries.empty and list(out.queries.columns) == [
        "query_id",
        "rank",
        "kind",
        "train_id",
        "score",
    ]
    assert out.leaks.empty and out.counts["n_query"] == 0 and out.counts["n_leaks"] == 0
    assert len(out.train) == 6


def test_string_ids_are_kept() -> None:
    inp = _clean(n_train=4, n_query=2)
    inp["pairwise"][2, 1] = 100.0
    out = summarise(**inp, train_ids=["a", "b", "c", "d"], query_ids=["q1", "q2"])
    assert out.train["id"].tolist() == ["a", "b", "c", "d"]
    assert out.leaks["train_id"].tolist() == ["c"] and out.leaks["query_id"].tolist() == ["q2"]


def test_torch_inputs_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    inp = _clean(n_train=10, n_query=2)
    out = summarise(**{k: torch.as_tensor(v, dtype=torch.float32) for k, v in inp.items()})
    assert len(out.train) == 10 and out.train["self_influence"].dtype == np.float64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"self_inf": np.zeros(9)}, "self_inf has length 9 but pairwise has n_train = 10"),
        ({"group_inf": np.zeros(11)}, "group_inf has length 11"),
        ({"query_self_drop": np.zeros(2)}, "query_self_drop has length 2 but pairwise has n_query"),
        ({"pairwise": np.zeros(10)}, r"pairwise must be \[n_train, n_query\]"),
        ({"self_inf": np.zeros((10, 1))}, "self_inf must be one-dimensional"),
        ({"train_ids": np.arange(3)}, "train_ids must be one-dimensional of length 10"),
        ({"train_labels": np.arange(11)}, "train_labels must be one-dimensional of length 10"),
        ({"query_ids": np.arange(4)}, "query_ids must be one-dimensional of length 3"),
        ({"pairwise": [["a"]]}, "pairwise must be numeric"),
        ({"calib_self_inf": np.zeros((4, 2))}, "calib_self_inf must be one-dimensional"),
        ({"calib_group_inf": [["x"]]}, "calib_group_inf must be numeric"),
    ],
)
def test_shape_mismatch_is_a_clear_value_error(change: dict, message: str) -> None:
    inp = _clean(n_train=10, n_query=3)
    inp.update(change)
    with pytest.raises(ValueError, match=message):
        summarise(**inp)


def test_empty_training_set_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one training example"):
        summarise(np.zeros((0, 2)), [], [], query_self_drop=[1.0, 1.0])


def test_thresholds_are_validated() -> None:
    th = GateThresholds()
    assert (th.mislabel_z, th.max_flagged_fraction, th.leak_cosine, th.max_leaks, th.top_k) == (
        3.5,
        0.05,
        0.99,
        0,
        10,
    )
    assert (th.mislabel_alpha, th.harmful_alpha) == (0.01, 0.01)
    # the calibrated rate must sit well inside the gate's budget by default
    assert th.mislabel_alpha <= th.max_flagged_fraction / 5
    assert th.harmful_alpha <= th.max_harmful_fraction / 5
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValidationError):
            GateThresholds(mislabel_alpha=bad)
        with pytest.raises(ValidationError):
            GateThresholds(harmful_alpha=bad)
    with pytest.raises(ValidationError, match="max_flaged_fraction"):
        GateThresholds(max_flaged_fraction=0.1)  # typo: extra keys are forbidden
    with pytest.raises(ValidationError):
        GateThresholds(max_flagged_fraction=1.5)
    with pytest.raises(ValidationError):
        GateThresholds(top_k=0)
    assert GateThresholds.model_validate({"max_leaks": 2}).max_leaks == 2
    for name, info in GateThresholds.model_fields.items():
        assert info.description, f"GateThresholds.{name} has no description"


def test_train_table_dtypes_are_simple() -> None:
    out = summarise(**_clean(n_train=20, n_query=2))
    dtypes = out.train.dtypes
    assert pd.api.types.is_bool_dtype(dtypes["flag_mislabel"])
    assert pd.api.types.is_bool_dtype(dtypes["flag_harmful"])
    assert all(dtypes[c] == np.float64 for c in ["self_influence", "self_z", "group_influence"])
    assert pd.api.types.is_integer_dtype(dtypes["id"])


# ------------------------------------------------------------------ calibrated (conformal) rules


def _heavy(rng: np.random.Generator, n: int) -> np.ndarray:
    """Self-influence-like scores: positive, spread over many orders of magnitude (as measured)."""
    return 10.0 ** rng.normal(-3.0, 2.0, size=n)


def test_conformal_threshold_known_values() -> None:
    calib = np.arange(1.0, 100.0)  # m = 99: k = ceil(100 * (1 - alpha))
    assert conformal_threshold(calib, 0.1) == pytest.approx((90.0, 0.1, 99))
    assert conformal_threshold(calib, 0.05) == pytest.approx((95.0, 0.05, 99))
    assert conformal_threshold(calib[::-1], 0.05)[0] == 95.0  # order does not matter
    # fewer than 1 / alpha - 1 scores: capped at the largest, alpha_eff = 1 / (m + 1)
    assert conformal_threshold(calib, 0.001) == pytest.approx((99.0, 0.01, 99))
    with_bad = np.concatenate([calib, [np.nan, np.inf, -np.inf]])
    assert conformal_threshold(with_bad, 0.1) == pytest.approx((90.0, 0.1, 99))
    thr, alpha_eff, m = conformal_threshold([np.nan], 0.1)
    assert np.isnan(thr) and np.isnan(alpha_eff) and m == 0
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            conformal_threshold(calib, bad)


def test_calibrated_mislabel_flags_strictly_above_threshold() -> None:
    inp = _clean(n_train=5, n_query=1)
    inp["self_inf"] = np.array([89.5, 90.0, 90.5, 1000.0, np.nan])
    out = summarise(
        **inp, calib_self_inf=np.arange(1.0, 100.0), thresholds=GateThresholds(mislabel_alpha=0.1)
    )
    assert out.train["flag_mislabel"].tolist() == [False, False, True, True, False]
    c = out.counts
    assert c["mislabel_calibrated"] == 1 and c["n_calib_self"] == 99
    assert c["mislabel_threshold"] == 90.0 and c["mislabel_alpha_eff"] == pytest.approx(0.1)
    assert c["n_flagged_mislabel"] == 2


@pytest.mark.parametrize("seed", range(5))
def test_calibrated_rule_controls_false_flags_on_heavy_tailed_clean_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    inp = _clean(n_train=5000, n_query=1, seed=seed)
    inp["self_inf"] = _heavy(rng, 5000)
    inp["group_inf"] = rng.standard_t(2, size=5000) * 1e-3
    out = summarise(
        **inp,
        calib_self_inf=_heavy(rng, 300),
        calib_group_inf=rng.standard_t(2, size=300) * 1e-3,
    )
    # exchangeable clean scores: about alpha = 1% harmful (calibration noise: sd ~0.6%); the
    # mislabel flag is a union of two alpha-rules, so its bound is 2% (+ the same noise)
    assert out.counts["harmful_fraction"] <= 0.03
    assert out.counts["flagged_fraction"] <= 0.045
    assert out.counts["flagged_fraction"] <= out.counts["harmful_fraction"] + 0.03
    assert out.counts["mislabel_alpha_eff"] <= 0.01 and out.counts["harmful_alpha_eff"] <= 0.01


def test_harmful_and_atypical_is_a_suspected_mislabel() -> None:
    """Fitted flips sit below the held-out self-influence tail but hurt the clean set."""
    rng = np.random.default_rng(12)
    inp = _clean(n_train=1000, n_query=1)
    calib_self = rng.uniform(1.0, 10.0, size=300)  # held-out clean points: median ~5.5
    inp["self_inf"] = rng.uniform(0.1, 3.0, size=1000)  # fitted training points score lower
    inp["group_inf"] = rng.normal(0.0, 1e-3, size=1000)
    flips = np.arange(0, 1000, 20)  # 50 planted
    inp["self_inf"][flips] = 8.0  # atypical, but below the calibration maximum
    inp["group_inf"][flips] = -1.0  # and clearly harmful
    hard_but_clean = np.arange(5, 1000, 50)  # 20 points: harmful, not atypical
    inp["group_inf"][hard_but_clean] = -1.0
    out = summarise(**inp, calib_self_inf=calib_self, calib_group_inf=rng.normal(0, 1e-3, 300))
    flags = out.train["flag_mislabel"].to_numpy()
    assert flags[flips].all()
    assert not flags[hard_but_clean].any()
    assert out.train["flag_harmful"].to_numpy()[hard_but_clean].all()


def test_calibrated_rule_finds_planted_mislabels() -> None:
    rng = np.random.default_rng(11)
    inp = _clean(n_train=2000, n_query=1)
    inp["self_inf"] = _heavy(rng, 2000)
    planted = rng.choice(2000, size=200, replace=False)
    inp["self_inf"][planted] = 10.0 ** rng.uniform(5.0, 6.0, size=200)  # far above clean tail
    out = summarise(**inp, calib_self_inf=_heavy(rng, 300))
    flags = out.train["flag_mislabel"].to_numpy()
    assert flags[planted].all()
    assert 0.10 <= out.counts["flagged_fraction"] <= 0.13  # the planted 10% + ~1% clean


def test_calibrated_harmful_needs_negative_influence_beyond_calibration() -> None:
    rng = np.random.default_rng(12)
    inp = _clean(n_train=500, n_query=1)
    calib = rng.normal(size=300)
    inp["group_inf"] = rng.normal(size=500) * 0.1
    inp["group_inf"][[10, 20]] = -20.0
    inp["group_inf"][30] = +20.0
    out = summarise(**inp, calib_group_inf=calib)
    assert set(np.flatnonzero(out.train["flag_harmful"])) == {10, 20}
    assert out.counts["harmful_threshold"] < 0 and out.counts["harmful_calibrated"] == 1
    # calibration examples all helpful: any negative influence is beyond them, but a positive
    # one never counts as harmful, whatever the threshold
    inp["group_inf"] = np.array([-0.5, 0.0, 0.5, 3.0] + [1.0] * 496)
    out = summarise(**inp, calib_group_inf=rng.uniform(1.0, 2.0, size=300))
    assert out.train["flag_harmful"].tolist()[:4] == [True, False, False, False]
    assert out.counts["n_harmful"] == 1


def test_harmful_by_loss_after_fit_needs_both_conditions() -> None:
    """With the losses after the validation fit, harmful = group influence < 0 and the loss
    after the fit above the conformal threshold of the calibration rows' (reported as
    ``harmful_threshold``; the group-influence threshold is not used)."""
    rng = np.random.default_rng(21)
    inp = _clean(n_train=500, n_query=1)
    inp["group_inf"] = -np.abs(rng.normal(size=500)) * 0.1  # all hurt a little
    after = rng.uniform(0.0, 1.0, size=500)
    after[[10, 20]] = 5.0  # far above every calibration loss
    inp["group_inf"][20] = 0.3  # ... but helps the validation set: not harmful
    calib_after = rng.uniform(0.0, 2.0, size=300)
    calib_group = rng.normal(size=300) * 1e-6  # would flag nearly every row by itself
    out = summarise(
        **inp,
        calib_group_inf=calib_group,
        loss_after_fit=after,
        calib_loss_after_fit=calib_after,
    )
    assert set(np.flatnonzero(out.train["flag_harmful"])) == {10}
    thr, alpha_eff, m = conformal_threshold(calib_after, GateThresholds().harmful_alpha)
    assert out.counts["harmful_threshold"] == thr and out.counts["n_calib_group"] == m == 300
    assert out.counts["harmful_alpha_eff"] == alpha_eff
    assert out.counts["harmful_by_loss_after_fit"] == 1 and out.counts["harmful_calibrated"] == 1
    np.testing.assert_array_equal(out.train["loss_after_fit"].to_numpy(), after)
    # exchangeable clean losses: about alpha flagged, whatever the group influence's scale
    clean = summarise(
        **inp,
        loss_after_fit=rng.exponential(size=500),
        calib_loss_after_fit=rng.exponential(size=2000),
    )
    assert clean.counts["harmful_fraction"] <= 0.03


def test_harmful_without_calibration_losses_keeps_the_group_rule() -> None:
    """Losses after the fit without the calibration rows' (an older score cache), or none
    finite: the group-influence threshold; the table's column is NaN when none are given."""
    rng = np.random.default_rng(22)
    inp = _clean(n_train=300, n_query=1)
    inp["group_inf"][[4, 5]] = -20.0
    calib = rng.normal(size=300)
    base = summarise(**inp, calib_group_inf=calib)
    assert base.counts["harmful_by_loss_after_fit"] == 0
    assert {4, 5} <= set(np.flatnonzero(base.train["flag_harmful"]))
    assert base.train["loss_after_fit"].isna().all()
    for extra in (
        {"loss_after_fit": np.ones(300)},
        {"loss_after_fit": np.ones(300), "calib_loss_after_fit": np.full(9, np.nan)},
    ):
        out = summarise(**inp, calib_group_inf=calib, **extra)
        assert out.counts["harmful_by_loss_after_fit"] == 0
        assert (out.train["flag_harmful"] == base.train["flag_harmful"]).all()
    with pytest.raises(ValueError, match="loss_after_fit has length 3"):
        summarise(**inp, loss_after_fit=np.ones(3), calib_loss_after_fit=np.ones(300))


def test_calibrated_rules_are_scale_free() -> None:
    rng = np.random.default_rng(13)
    inp = _clean(n_train=400, n_query=1)
    inp["self_inf"] = _heavy(rng, 400)
    inp["self_inf"][[5, 6]] = 1e6
    inp["group_inf"][[1, 2]] = -50.0
    calib_s, calib_g = _heavy(rng, 200), rng.normal(size=200)
    a = summarise(**inp, calib_self_inf=calib_s, calib_group_inf=calib_g)
    small = dict(inp, self_inf=inp["self_inf"] * 1e-9, group_inf=inp["group_inf"] * 1e-9)
    b = summarise(**small, calib_self_inf=calib_s * 1e-9, calib_group_inf=calib_g * 1e-9)
    for col in ("flag_mislabel", "flag_harmful"):
        assert (a.train[col] == b.train[col]).all()
    assert a.counts["n_flagged_mislabel"] > 0 and a.counts["n_harmful"] > 0


def test_each_flag_falls_back_without_its_calibration(caplog: pytest.LogCaptureFixture) -> None:
    inp = _clean(n_train=500, seed=4)
    inp["self_inf"][[3, 99]] = [22.0, 25.0]  # baseline 10 + N(0, 1)
    inp["group_inf"][[10, 20]] = -20.0
    with caplog.at_level("WARNING", logger="mirrorinf.summary"):
        out = summarise(**inp, calib_self_inf=np.full(3, np.nan), calib_group_inf=np.zeros(200))
    # no finite calibration self-influence: robust-z fallback flags the planted two
    assert set(np.flatnonzero(out.train["flag_mislabel"])) == {3, 99}
    assert out.counts["mislabel_calibrated"] == 0 and np.isnan(out.counts["mislabel_threshold"])
    # calibrated harmful rule: calibration all 0, so every negative influence is flagged
    assert out.counts["harmful_calibrated"] == 1
    assert out.counts["n_harmful"] == int((inp["group_inf"] < 0).sum())
    assert "mislabel flag: no finite calib_self_inf" in caplog.text
    assert "harmful flag: no finite" not in caplog.text


def test_small_calibration_set_uses_its_maximum_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inp = _clean(n_train=50, n_query=1)
    calib = np.arange(1.0, 11.0)  # m = 10 < 1 / 0.01 - 1
    inp["self_inf"] = np.linspace(0.0, 20.0, 50)
    with caplog.at_level("WARNING", logger="mirrorinf.summary"):
        out = summarise(**inp, calib_self_inf=calib)
    assert out.counts["mislabel_threshold"] == 10.0
    assert out.counts["mislabel_alpha_eff"] == pytest.approx(1 / 11)
    assert (out.train["flag_mislabel"] == (inp["self_inf"] > 10.0)).all()
    assert "cannot certify alpha=0.01" in caplog.text


def test_leak_rule_uses_plain_scores_when_given() -> None:
    """Anchored pairwise is on another scale: the cosine must use the plain pairwise pass."""
    inp = _clean(n_train=100, n_query=4, seed=6)
    inp["query_self_drop"] = np.full(4, 10.0)
    plain = inp["pairwise"].copy()
    plain[9, 1] = 10.0
    inp["self_inf"][9] = 10.0
    anchored = inp["pairwise"] * 1e4  # other scale, no duplicate visible in it
    out = summarise(**dict(inp, pairwise=anchored), leak_pairwise=plain)
    assert list(out.leaks["train_id"]) == [9]
    assert out.leaks["cosine"].tolist() == pytest.approx([1.0])
    # the query tables keep the anchored scores
    assert out.queries["score"].abs().max() > 100
    with pytest.raises(ValueError, match="leak_pairwise has shape"):
        summarise(**inp, leak_pairwise=plain[:, :2])


def test_leak_needs_a_near_copy_when_inputs_are_given() -> None:
    """Aligned gradients alone (e.g. a 2-class model) are not a leak without a near-copy."""
    rng = np.random.default_rng(8)
    inp = _clean(n_train=50, n_query=3, seed=8)
    inp["query_self_drop"] = np.full(3, 10.0)
    for i, j in ((4, 0), (5, 1), (6, 2)):  # gradient cosine 1.0 for all three pairs
        inp["pairwise"][i, j] = 10.0
        inp["self_inf"][i] = 10.0
    train_x = rng.normal(size=(50, 8))
    query_x = rng.normal(size=(3, 8))
    query_x[0] = train_x[4]  # exact copy
    query_x[1] = train_x[5] * 1.01  # near copy (1% away)
    out = summarise(**inp, train_x=train_x, query_x=query_x)
    assert list(out.leaks["query_id"]) == [0, 1]
    assert out.leaks["input_distance"].tolist() == pytest.approx([0.0, 0.01 / 1.01], abs=1e-9)
    assert len(summarise(**inp).leaks) == 3  # without inputs: the gradient rule alone
    with pytest.raises(ValueError, match="features"):
        summarise(**inp, train_x=train_x, query_x=query_x[:, :4])


def test_harmful_excess_limit_holds_clean_exchangeable_rows_and_catches_exposed_ones() -> None:
    """Clean training rows exchangeable with 50 calibration rows (the worst case: unfitted)
    exceed the harmful_excess limit in about 2.3% of draws (one-sided 2 sd); without the margin
    it would be about half. 25% of rows far above the calibration bulk exceed it every time
    (the limit is about 0.24 here: tail 0.1 + 0.05 + 2 sd of 50 calibration rows)."""
    from mirrorinf.summary import exposed_rows, max_exposed_fraction

    rng = np.random.default_rng(0)
    th = GateThresholds()
    over_clean = over_noisy = 0
    draws, n, m = 400, 400, 50
    for _ in range(draws):
        calib = rng.lognormal(size=m)
        after = rng.lognormal(size=n)
        thr, tail, _ = conformal_threshold(calib, 1 - th.exposed_quantile)
        limit = max_exposed_fraction(tail, m, n, th.max_harmful_fraction)
        group = -np.ones(n)
        over_clean += exposed_rows(group, after, thr).mean() > limit
        after[: n // 4] = 50.0 + rng.uniform(size=n // 4)
        over_noisy += exposed_rows(group, after, thr).mean() > limit
    assert over_clean / draws <= 0.05, over_clean
    assert over_noisy == draws
