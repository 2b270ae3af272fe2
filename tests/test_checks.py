"""The Great Expectations gate over influence tables, with real GX (no mocks)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mirrorinf.summary import GateThresholds, InfluenceTables, summarise
from mirrorinf.tasks.checks import CheckResult, validate_tables

CHECKS = [
    "self_influence_not_null",
    "self_influence_finite",
    "group_influence_not_null",
    "group_influence_finite",
    "self_influence_not_degenerate",
    "mislabel_fraction",
    "harmful_fraction",
    "harmful_excess",
    "leaks",
]


def _inputs(n_train: int = 400, n_query: int = 10, seed: int = 0) -> dict[str, Any]:
    """Clean Gaussian scores (seed 0 has no flags and no leaks at the default thresholds)."""
    rng = np.random.default_rng(seed)
    return {
        "pairwise": rng.normal(size=(n_train, n_query)),
        "self_inf": 10.0 + rng.normal(size=n_train),  # positive, as self-influence is
        "group_inf": rng.normal(size=n_train),
        "query_self_drop": np.full(n_query, 100.0),
    }


def _tables(thresholds: GateThresholds | None = None, **changes: Any) -> InfluenceTables:
    inp = _inputs()
    for key, edit in changes.items():
        edit(inp[key])
    return summarise(**inp, thresholds=thresholds)


def _by_check(result: CheckResult) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in result.results}


def test_clean_tables_pass_every_check() -> None:
    result = validate_tables(_tables())
    assert result.success is True
    assert [r["check"] for r in result.results] == CHECKS
    assert result.failed == []
    rows = _by_check(result)
    assert rows["mislabel_fraction"]["observed"] == 0.0
    assert rows["mislabel_fraction"]["threshold"] == 0.05
    assert rows["leaks"]["observed"] == 0
    assert rows["self_influence_not_degenerate"]["observed"] > 0
    assert set(result.timings) == {"import_s", "validate_s"}


def test_nan_self_influence_fails_not_null() -> None:
    def plant(a: np.ndarray) -> None:
        a[[5, 6]] = np.nan

    result = validate_tables(_tables(self_inf=plant))
    assert result.success is False
    assert result.failed == ["self_influence_not_null"]
    assert _by_check(result)["self_influence_not_null"]["observed"] == 2


def test_infinite_group_influence_fails_finite() -> None:
    def plant(a: np.ndarray) -> None:
        a[3] = np.inf

    result = validate_tables(_tables(group_inf=plant))
    assert result.failed == ["group_influence_finite"]
    assert _by_check(result)["group_influence_finite"]["observed"] == 1


def test_all_equal_self_influence_fails_not_degenerate() -> None:
    def flatten(a: np.ndarray) -> None:
        a[:] = 0.0

    result = validate_tables(_tables(self_inf=flatten))
    assert result.failed == ["self_influence_not_degenerate"]
    assert _by_check(result)["self_influence_not_degenerate"]["observed"] == 0.0


def test_too_many_suspected_mislabels_fails() -> None:
    def plant(a: np.ndarray) -> None:
        a[:40] = 50.0  # 10% of 400 far above the bulk

    tables = _tables(self_inf=plant)
    assert tables.counts["flagged_fraction"] == pytest.approx(0.1)
    result = validate_tables(tables)
    assert result.failed == ["mislabel_fraction"]
    assert _by_check(result)["mislabel_fraction"]["observed"] == pytest.approx(0.1)
    # the same tables pass when the params allow 20%
    relaxed = GateThresholds(max_flagged_fraction=0.2)
    assert validate_tables(tables, relaxed).success is True


def test_too_many_harmful_examples_fails() -> None:
    def plant(a: np.ndarray) -> None:
        a[100:130] = -50.0  # 7.5% strongly harmful

    result = validate_tables(_tables(group_inf=plant))
    assert result.failed == ["harmful_fraction"]
    assert _by_check(result)["harmful_fraction"]["observed"] == pytest.approx(0.075)


def _loss_tables(n_shifted: int, seed: int = 0, **th: Any) -> InfluenceTables:
    """Calibrated tables whose losses after the fit are one distribution for 100 calibration
    rows and the clean training rows, with ``n_shifted`` of 400 training rows shifted far above
    it (flips the validation fit exposes) but below the calibration maximum (one hard row)."""
    rng = np.random.default_rng(seed)
    inp = _inputs()
    after = rng.exponential(0.3, size=400)
    after[:n_shifted] = 2.0 + rng.uniform(size=n_shifted)
    calib = rng.exponential(0.3, size=100)
    calib[0] = 10.0  # the hard validation row: the per-row threshold at alpha 0.01
    inp["group_inf"] = -np.abs(inp["group_inf"])  # every row hurt by the fit, as flips are
    return summarise(
        **inp,
        thresholds=GateThresholds(**th),
        calib_self_inf=10.0 + rng.normal(size=100),
        calib_group_inf=-np.abs(rng.normal(size=100)),
        loss_after_fit=after,
        calib_loss_after_fit=calib,
    )


def test_exposed_rows_fail_harmful_excess_where_the_flag_count_misses_them() -> None:
    clean, noisy = _loss_tables(0), _loss_tables(80)  # 20% exposed
    assert clean.counts["n_harmful"] == noisy.counts["n_harmful"] == 0  # all below 10.0
    ok, bad = validate_tables(clean), validate_tables(noisy)
    assert ok.success is True, ok.results
    assert bad.failed == ["harmful_excess"]
    row = _by_check(bad)["harmful_excess"]
    assert row["observed"] == pytest.approx(noisy.counts["exposed_fraction"])
    assert row["observed"] >= 0.2
    assert row["threshold"] == pytest.approx(noisy.counts["max_exposed_fraction"])
    # the limit is the clean tail (about 10%) + max_harmful_fraction + a margin, so a larger
    # allowance passes the same tables
    assert 0.15 < row["threshold"] < 0.25
    assert validate_tables(noisy, GateThresholds(max_harmful_fraction=0.2)).success is True


def test_harmful_excess_is_not_computable_without_losses_after_the_fit() -> None:
    tables = _tables()
    assert tables.counts["max_exposed_fraction"] == 1.0
    row = _by_check(validate_tables(tables))["harmful_excess"]
    assert row["success"] is True and row["observed"] == 0.0 and row["threshold"] == 1.0


def test_planted_leak_fails_and_max_leaks_allows_it() -> None:
    def plant(a: np.ndarray) -> None:
        a[7, 2] = 100.0  # exact duplicate of query 2: scores the query's own self-drop

    tables = _tables(pairwise=plant)
    assert len(tables.leaks) == 1
    result = validate_tables(tables)
    assert result.failed == ["leaks"]
    assert _by_check(result)["leaks"]["observed"] == 1
    assert validate_tables(tables, GateThresholds(max_leaks=1)).success is True


def test_no_queries_passes() -> None:
    inp = _inputs(n_query=0)
    result = validate_tables(summarise(**inp))
    assert result.success is True


def test_as_json_round_trips_with_plain_types() -> None:
    def plant(a: np.ndarray) -> None:
        a[:] = np.nan

    # all-NaN self-influence: not null fails and its stdev is NaN (written as null)
    result = validate_tables(_tables(self_inf=plant))
    data = json.loads(result.as_json())
    assert data["success"] is False
    assert [r["check"] for r in data["results"]] == CHECKS
    for row in data["results"]:
        assert isinstance(row["success"], bool)
        assert row["observed"] is None or isinstance(row["observed"], (int, float, str))
    assert data["results"] == json.loads(result.as_json())["results"]
    clean = json.loads(validate_tables(_tables()).as_json())
    assert clean["success"] is True and all(r["success"] is True for r in clean["results"])


def test_string_ids_do_not_reach_gx() -> None:
    inp = _inputs(n_train=50, n_query=2)
    tables = summarise(
        **inp,
        train_ids=[f"img_{i}" for i in range(50)],
        train_labels=np.array(["cat", "dog"] * 25, dtype=object),
        query_ids=["q0", "q1"],
    )
    assert validate_tables(tables).success is True


def _calibrated(planted_fraction: float, seed: int = 0) -> InfluenceTables:
    """Heavy-tailed scores like the engine's (orders of magnitude) with clean calibration scores
    from the same distribution; ``planted_fraction`` of the training set made far more atypical."""
    rng = np.random.default_rng(seed)
    n = 1000
    self_inf = 10.0 ** rng.normal(-3.0, 2.0, size=n)
    planted = rng.choice(n, size=round(planted_fraction * n), replace=False)
    self_inf[planted] = 10.0 ** rng.uniform(5.0, 6.0, size=len(planted))
    return summarise(
        np.zeros((n, 0)),
        self_inf,
        rng.standard_t(2, size=n),
        query_self_drop=[],
        calib_self_inf=10.0 ** rng.normal(-3.0, 2.0, size=300),
        calib_group_inf=rng.standard_t(2, size=300),
    )


def test_calibrated_gate_passes_clean_and_fails_planted_noise() -> None:
    clean = validate_tables(_calibrated(0.0))
    assert clean.success is True
    assert _by_check(clean)["mislabel_fraction"]["observed"] <= 0.03
    noisy = validate_tables(_calibrated(0.1))
    assert noisy.failed == ["mislabel_fraction"]
    assert _by_check(noisy)["mislabel_fraction"]["observed"] >= 0.1


PRELOAD = """
import sys, time
from mirrorinf.tasks.checks import preload_gx
from mirrorinf.tasks.server import prefect_api
t0 = time.perf_counter()
with preload_gx():
    time.sleep(0.01)  # the block: waiting on another process
assert "great_expectations" in sys.modules, "not imported when the block ended"
entered = []
class Probe:
    def __enter__(self): entered.append(1)
    def __exit__(self, *exc): return False
with prefect_api(while_starting=Probe()):  # configured API (PREFECT_API_URL): no start-up
    pass
assert entered == [], "entered without a server to start"
"""


def test_preload_imports_gx_within_the_block_and_only_around_a_start() -> None:
    """GX is imported by the end of the preload block (a thread beside it); prefect_api enters
    ``while_starting`` only when it starts a temporary server."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # configured, never called
    proc = subprocess.run([sys.executable, "-c", PRELOAD], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
