"""Scores on disk: the score matrix streamed to a signed .npy, memory-mapped when verified, and
every summary of it computed in row blocks, equal to a plain in-memory computation."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirrorinf.integrity import RowBlocks, SignedRecords, write_npy
from mirrorinf.review import ReviewInputs, review_tables
from mirrorinf.shards import ShardStore, shard_ranges
from mirrorinf.summary import GateThresholds, summarise
from mirrorinf.tasks.score import ScoreBundle, load_cached_scores, save_cached_scores
from mirrorinf.tasks.tracking import place_array


def _scores(n: int, q: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 scores with ties, non-finite values and one exact leak; per-row arrays float64."""
    rng = np.random.default_rng(seed)
    pairwise = np.round(rng.standard_normal((n, q)), 1).astype(np.float32)  # many ties
    pairwise[rng.random((n, q)) < 0.03] = np.nan
    pairwise[1, 0] = np.inf
    self_inf = rng.gamma(2.0, 1.0, n)
    self_inf[::11] = -1.0  # no cosine for these rows
    drop = rng.gamma(2.0, 1.0, q) + 0.5
    drop[-1] = 0.0  # nor for this query
    pairwise[5, 2] = np.float32(np.sqrt(self_inf[5] * drop[2]))  # cosine ~1: a leak
    return {
        "pairwise": pairwise,
        "self_inf": self_inf,
        "group_inf": rng.standard_normal(n),
        "query_self_drop": drop,
        "calib_self_inf": rng.gamma(2.0, 1.0, 300),
        "calib_group_inf": rng.standard_normal(300),
    }


def _reference(inp: dict[str, np.ndarray], k: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Top-k rows per query and the leak rule, computed the plain way: the whole matrix in
    float64, one full sort per query (score, then training row; non-finite last)."""
    p = inp["pairwise"].astype(np.float64)
    n, q = p.shape
    rows = []
    for j in range(q):
        col = p[:, j]
        for kind, key in (("proponent", -col), ("opponent", col)):
            key = np.where(np.isfinite(col), key, np.inf)
            for rank, i in enumerate(np.lexsort((np.arange(n), key))[:k], start=1):
                rows.append((j, rank, kind, i, col[i]))
    top = pd.DataFrame(rows, columns=["query_id", "rank", "kind", "train_id", "score"])
    s = np.where(inp["self_inf"] > 0, inp["self_inf"], np.nan)
    d = np.where(inp["query_self_drop"] > 0, inp["query_self_drop"], np.nan)
    with np.errstate(invalid="ignore"):
        cos = p / np.sqrt(s[:, None] * d)
    leaks = []
    for j in range(q):
        finite = np.isfinite(cos[:, j])
        if finite.any():
            i = int(np.argmax(np.where(finite, cos[:, j], -np.inf)))
            if cos[i, j] >= GateThresholds().leak_cosine:
                leaks.append((j, i, p[i, j], cos[i, j]))
    leak = pd.DataFrame(leaks, columns=["query_id", "train_id", "score", "cosine"])
    return top, leak, int((~np.isfinite(p)).sum())


def _summarise(inp: dict[str, np.ndarray], pairwise: np.ndarray, **kw):
    rest = {k: v for k, v in inp.items() if k != "pairwise"}
    return summarise(pairwise, **rest, **kw)


@pytest.mark.parametrize("block_rows", [1, 7, 64, None])
def test_streaming_summary_equals_the_in_memory_computation(block_rows: int | None) -> None:
    inp = _scores(150, 6)
    k = GateThresholds().top_k
    top, leaks, nonfinite = _reference(inp, k)
    out = _summarise(inp, inp["pairwise"], block_rows=block_rows)
    got = out.queries.assign(train_id=out.queries["train_id"].astype(np.int64))
    pd.testing.assert_frame_equal(got, top.astype(got.dtypes.to_dict()), check_exact=True)
    assert len(leaks) >= 1 and 2 in set(leaks["query_id"])
    pd.testing.assert_frame_equal(
        out.leaks[["query_id", "train_id", "score", "cosine"]].astype(np.float64),
        leaks.astype(np.float64),
        check_exact=True,
    )
    assert out.counts["n_nonfinite_pairwise"] == nonfinite
    # and the whole matrix at once (one block) gives the same tables, bit for bit
    whole = _summarise(inp, inp["pairwise"].astype(np.float64), block_rows=10**9)
    for name in ("train", "queries", "leaks"):
        pd.testing.assert_frame_equal(getattr(out, name), getattr(whole, name), check_exact=True)


def test_summary_of_assembled_shards_equals_the_unsharded_one(tmp_path: Path) -> None:
    inp = _scores(97, 5, seed=3)
    leak = np.random.default_rng(4).standard_normal(inp["pairwise"].shape).astype(np.float32)
    store = ShardStore(tmp_path / "store", {"model": "m"}).open()
    for start, stop in shard_ranges(97, 20):
        store.save(start, stop, {
            "pairwise": inp["pairwise"][start:stop],
            "leak_pairwise": leak[start:stop],
            "self_influence": inp["self_inf"][start:stop],
            "group_influence": inp["group_inf"][start:stop],
            "query_self_drop": inp["query_self_drop"],
        })  # fmt: skip
    rows = store.assemble(shard_ranges(97, 20))
    assert isinstance(rows["pairwise"], np.memmap) and isinstance(rows["leak_pairwise"], np.memmap)
    assert rows["pairwise"].dtype == np.float32
    np.testing.assert_array_equal(rows["pairwise"], inp["pairwise"])
    np.testing.assert_array_equal(rows["self_influence"], inp["self_inf"])
    sharded = _summarise(inp, rows["pairwise"], leak_pairwise=rows["leak_pairwise"], block_rows=8)
    single = _summarise(inp, inp["pairwise"], leak_pairwise=leak)
    for name in ("train", "queries", "leaks"):
        pd.testing.assert_frame_equal(getattr(sharded, name), getattr(single, name))
    assert sharded.counts == pytest.approx(single.counts, nan_ok=True)


def test_summary_holds_no_float64_copy_of_the_matrix() -> None:
    inp = _scores(40_000, 100)
    float32_matrix = inp["pairwise"].nbytes
    tracemalloc.start()
    _summarise(inp, inp["pairwise"], block_rows=500)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # per-row arrays and tables (~110 bytes a row) and one block's temporaries: 8.7x the
    # float32 matrix before the summary streamed
    assert peak < 0.8 * float32_matrix, f"summary peaked at {peak / 2**20:.1f} MiB"


def _bundle(n: int = 40, q: int = 3) -> ScoreBundle:
    inp = _scores(n, q)
    return ScoreBundle(
        pairwise=inp["pairwise"],
        self_influence=inp["self_inf"],
        group_influence=inp["group_inf"],
        query_self_drop=inp["query_self_drop"],
        calib_self_influence=inp["calib_self_inf"],
        reports={"pairwise": {"scale": 1.0}},
        seconds=1.5,
    )


def test_cache_hit_is_a_verified_memory_map_and_a_changed_byte_is_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = _bundle()
    save_cached_scores(tmp_path, "k1", bundle)
    hit = load_cached_scores(tmp_path, "k1")
    assert hit is not None and isinstance(hit.pairwise, np.memmap)
    assert not hit.pairwise.flags.writeable
    np.testing.assert_array_equal(hit.pairwise, bundle.pairwise)
    np.testing.assert_array_equal(hit.self_influence, bundle.self_influence)
    path = SignedRecords(tmp_path, "scores").array_path("k1", "pairwise")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last score
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        assert load_cached_scores(tmp_path, "k1") is None
    assert "sha256 mismatch" in caplog.text and not path.exists()


def test_streamed_npy_is_a_plain_npy_and_a_short_stream_leaves_nothing(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(6, 2)
    write_npy(tmp_path / "a.npy", RowBlocks(arr.shape, arr.dtype, [arr[:4], arr[4:]]))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), arr)
    with pytest.raises(ValueError, match="rows written"):
        write_npy(tmp_path / "b.npy", RowBlocks((7, 2), arr.dtype, [arr]))
    with pytest.raises(ValueError, match="does not fit"):
        write_npy(tmp_path / "c.npy", RowBlocks(arr.shape, np.float64, [arr]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_logged_matrix_is_the_stored_file_not_a_copy_in_memory(tmp_path: Path) -> None:
    save_cached_scores(tmp_path / "cache", "k", _bundle())
    hit = load_cached_scores(tmp_path / "cache", "k")
    assert hit is not None
    place_array(hit.pairwise, tmp_path / "pairwise.npy")
    stored = SignedRecords(tmp_path / "cache", "scores").array_path("k", "pairwise")
    assert (tmp_path / "pairwise.npy").read_bytes() == stored.read_bytes()
    place_array(hit.pairwise[:5], tmp_path / "head.npy")  # a part of it is saved, not linked
    np.testing.assert_array_equal(np.load(tmp_path / "head.npy"), hit.pairwise[:5])


def test_ui_tables_are_capped_and_ranked() -> None:
    inp = _scores(5_000, 300)
    inp["self_inf"] = np.abs(inp["self_inf"]) + 100.0  # every row far above calibration
    tables = _summarise(inp, inp["pairwise"])
    assert tables.train["flag_mislabel"].sum() > 1000
    review = ReviewInputs(
        tables=tables, train_x=np.zeros((5_000, 2)), query_x=np.zeros((300, 2)),
        query_ids=np.arange(300), query_labels=np.zeros(300), train_pred=np.zeros(5_000),
        checks=[], verdict="failed", reasons=[],
    )  # fmt: skip
    ui = review_tables(review, max_rows=1_000)
    flagged = ui["flagged_train"]
    assert len(flagged) == 1_000
    assert flagged["self_influence"].is_monotonic_decreasing
    assert flagged["self_influence"].iloc[0] == tables.train["self_influence"].max()
    top = ui["top_k_per_query"]
    assert len(top) <= 1_000 and len(top) % 20 == 0  # whole queries: 10 proponents, 10 opponents
    assert list(top["query_id"].unique()) == list(range(len(top) // 20))
