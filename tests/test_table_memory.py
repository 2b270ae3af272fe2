"""Memory per training row of the tables after scoring (issue 14: flat beyond the batch).

At N training rows the summary, the rankings and flag counts of the review and summary.json,
and the parquet file may use the table's own numeric columns and a few [N] temporaries, never a
Python object or a string per row, nor a sorted / filtered / Arrow copy of the whole table.
Traced with tracemalloc (numpy and Python) and Arrow's pool peak in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mirrorinf.summary import flag_rule_masks, head_positions, ranked_rows, summarise

N, Q = 200_000, 4
MiB = 2**20
# the table's columns summarise allocates: self/group influence, their z, loss after fit
# (float64) and two bool flags; ids and labels given as int64 are shared, not copied
TABLE_BYTES = 5 * 8 + 2


def _traced(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """(result, peak, kept) bytes traced while ``fn`` runs, above what was live before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak - before, kept - before


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "pairwise": rng.standard_normal((N, Q), dtype=np.float32),
        "self_inf": rng.random(N, dtype=np.float32) + 0.5,
        "group_inf": rng.standard_normal(N, dtype=np.float32),
        "loss_after_fit": rng.random(N, dtype=np.float32),
        "train_ids": np.arange(N, dtype=np.int64),
        "train_labels": rng.integers(0, 10, N),
        "calib_self_inf": rng.random(500) + 0.5,  # about 2% flagged
        "calib_group_inf": rng.standard_normal(500),
        "calib_loss_after_fit": rng.random(500),
    }


def _summarise(inputs: dict[str, Any]) -> Any:
    a = dict(inputs)
    return summarise(
        a.pop("pairwise"), a.pop("self_inf"), a.pop("group_inf"),
        query_self_drop=np.ones(Q), block_rows=4096, **a,
    )  # fmt: skip


def test_summarise_allocates_the_table_and_a_few_vectors(inputs: dict[str, Any]) -> None:
    tables, peak, kept = _traced(lambda: _summarise(inputs))
    assert tables.counts["n_flagged_mislabel"] > 0 and tables.counts["n_harmful"] > 0
    # the table once, plus at most four [N] float64 temporaries (robust z, conversions);
    # before: a copy of the table in the DataFrame and one temporary per robust-z step
    assert kept <= N * TABLE_BYTES + 2 * MiB, kept / N
    assert peak <= N * (TABLE_BYTES + 4 * 8) + 4 * MiB, peak / N


def test_rankings_and_flag_counts_copy_no_table(inputs: dict[str, Any]) -> None:
    tables = _summarise(inputs)

    def review_steps() -> Any:
        masks = flag_rule_masks(tables.train, tables.counts)
        rows = [
            ranked_rows(tables, "self_influence", 5, ascending=False, where="flag_mislabel"),
            ranked_rows(tables, "self_influence", 16, ascending=False),
            ranked_rows(tables, "group_influence", 5, ascending=True, where="flag_harmful"),
        ]
        return masks, rows

    (masks, rows), peak, _ = _traced(review_steps)
    assert int(masks[0].sum() + masks[1].sum()) == tables.counts["n_flagged_mislabel"]
    assert len(rows[1]) == 16
    # a few bytes a row (boolean masks, a partial selection's index and keys); before: a
    # string per row for the rule (80 B) and sorted copies of the whole table
    assert peak <= N * 24 + 2 * MiB, peak / N


_WRITE = """
import sys, numpy as np, pandas as pd, pyarrow as pa
from mirrorinf.io import write_parquet
n, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
cols = {c: rng.standard_normal(n) for c in ("self_influence", "self_z", "group_influence")}
frame = pd.DataFrame({"id": np.arange(n), "label": rng.integers(0, 10, n), **cols,
                      "flag_mislabel": rng.random(n) < 0.02}, copy=False)
write_parquet(frame, path)
peak = pa.default_memory_pool().max_memory()  # before reading back, which needs the table
assert pd.read_parquet(path).equals(frame)
print(peak)
"""


def test_parquet_is_written_without_an_arrow_copy_of_the_table(tmp_path: Path) -> None:
    # a fresh process: Arrow's pool peak is per process (pyarrow allocates outside tracemalloc)
    out = subprocess.run(
        [sys.executable, "-c", _WRITE, str(N), str(tmp_path / "train.parquet")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    peak = int(out.stdout.split()[-1])
    # one row group of 65,536 rows at a time (~8 MiB); ``to_parquet`` of the whole table in one
    # row group peaked at ~31 MiB here (32.5 MiB at 1M rows; this writer: 8 MiB at both)
    assert peak <= 16 * MiB, peak / MiB


def test_head_positions_orders_rows_as_pandas_sorts_them() -> None:
    """The partial selection gives pandas' order: ties (quicksort or stable), NaN, +-inf, +-0."""
    rng = np.random.default_rng(1)
    for trial in range(600):
        n = int(rng.integers(1, 60))
        v = rng.standard_normal(n)
        if trial % 4 == 1:
            v = np.round(v, 1)  # ties
        if trial % 4 == 2:
            v[rng.random(n) < 0.3] = np.nan
        if trial % 4 == 3:
            v[rng.random(n) < 0.2] = rng.choice([np.inf, -np.inf, 0.0, -0.0])
        rows = np.flatnonzero(rng.random(n) < 0.5)
        k = int(rng.integers(0, 12))
        frame = pd.DataFrame({"v": v})
        for asc in (True, False):
            for kind, stable in (("quicksort", False), ("stable", True)):
                want = frame.sort_values("v", ascending=asc, kind=kind).head(k).index
                got = head_positions(v, k, ascending=asc, stable=stable)
                assert np.array_equal(want.to_numpy(), got), (v, asc, kind, k)
                sub = frame.iloc[rows].sort_values("v", ascending=asc, kind=kind).head(k).index
                got = head_positions(v, k, ascending=asc, rows=rows, stable=stable)
                assert np.array_equal(sub.to_numpy(), got), (v, rows, asc, kind, k)
        with np.errstate(invalid="ignore"):
            neg = np.flatnonzero(v < 0)
        want = frame[frame["v"] < 0].nsmallest(k, "v").index.to_numpy()
        assert np.array_equal(want, head_positions(v, k, ascending=True, rows=neg, stable=True))


# The flow's steps after scoring, as the flow runs them, at N rows in a fresh process: verified
# cache read, summary + GX gate, summary.json, log_influence (npy, parquet, GX result), the
# predictions and the review (plots, report, UI tables) into a real SQLite MLflow store. Prints
# each step's traced peak (tracemalloc: numpy buffers and Python objects, deterministic, unlike
# a sampled RSS) above what was live before the cache read, and Arrow's pool peak, in MiB.
# Pages of the memory maps (verified cache, scratch arrays) are not allocations: not traced.
_FLOW_AFTER_SCORING = """
import json, sys, tracemalloc
from pathlib import Path
import numpy as np
n, q, tmp = int(sys.argv[1]), 20, Path(sys.argv[2])
from mirrorinf.tasks.env import set_tool_env
set_tool_env(tmp)
import mirrorinf.integrity, mirrorinf.io, mirrorinf.summary
# the batches (blocks streamed to and from disk, the summary's row blocks, parquet row groups)
# made small, so that they are full at both sizes and cancel
mirrorinf.integrity.BLOCK_BYTES = 2**20
mirrorinf.summary.summary_block_rows.__defaults__ = (2**22,)
mirrorinf.io.write_parquet.__defaults__ = (4096,)
import pyarrow as pa
import torch
import mirrorinf.review
from mirrorinf.flows.influence import _metrics, _summary
from mirrorinf.summary import GateThresholds
from mirrorinf.tasks.checks import _import_gx, summarise_and_check
from mirrorinf.tasks.data import load_dataset
from mirrorinf.tasks.model import predict_labels
from mirrorinf.tasks.score import ScoreBundle, load_cached_scores, save_cached_scores
from mirrorinf.tasks.tracking import get_client, log_influence, log_review
_import_gx()
rng = np.random.default_rng(0)
for name, rows in (("train", n), ("query", q)):
    np.savez(tmp / f"{name}.npz", x=rng.standard_normal((rows, 8), dtype=np.float32),
             y=rng.integers(0, 10, rows))
train, queries = (load_dataset(tmp / f"{s}.npz", name=s) for s in ("train", "query"))
model = torch.nn.Sequential(torch.nn.Linear(8, 10))
save_cached_scores(tmp / "cache", "k", ScoreBundle(  # float64 per-row vectors, as the engine's
    pairwise=rng.standard_normal((n, q), dtype=np.float32), self_influence=rng.random(n) + 0.5,
    group_influence=rng.standard_normal(n), loss_after_fit=rng.random(n),
    query_self_drop=np.ones(q), calib_self_influence=rng.random(500) + 0.5,
    calib_group_influence=rng.standard_normal(500), calib_loss_after_fit=rng.random(500),
))
uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
client = get_client(uri)
run_id = client.create_run(client.create_experiment("x", str(tmp / "art"))).info.run_id
peaks = {}
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
def step(name):
    peaks[name] = (tracemalloc.get_traced_memory()[1] - before) / 2**20
    tracemalloc.reset_peak()
scores = load_cached_scores(tmp / "cache", "k")
step("load")
tables, check = summarise_and_check(scores, train, queries, GateThresholds())
step("check")
summary = _summary(tables, scores, {})
log_influence(uri, run_id, scores=scores, tables=tables, check=check, verdict="passed",
              metrics=_metrics(tables, scores, check, {}, False), summary=summary)
step("log")
log_review(uri, run_id, tables=tables, check=check, train=train, queries=queries,
           predicted=predict_labels(model, train), verdict="passed", reasons=[])
step("review")
peaks["arrow"] = pa.default_memory_pool().max_memory() / 2**20
print(json.dumps(peaks))
"""


def test_flow_after_scoring_holds_a_few_bytes_a_row(tmp_path: Path) -> None:
    """Each step's traced peak grows by at most 72 B a training row from 50k to 450k rows: the
    per-row score vectors are the verified cache's memory maps, the table's computed columns and
    the gate's float flags live in file-backed scratch maps, the predictions are one array.
    Before: 40-110 B a row (float64 vectors read into memory, z-scores and flags in memory,
    predictions concatenated from a list of batches). Constant parts (imports, plots, full row
    blocks) cancel in the difference. Each size runs in its own fresh process."""
    sizes = {"small": 50_000, "large": 450_000}
    peaks = {}
    for name, n in sizes.items():
        (tmp_path / name).mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", _FLOW_AFTER_SCORING, str(n), str(tmp_path / name)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[name] = json.loads(proc.stdout.splitlines()[-1])
    a, b = peaks["small"], peaks["large"]
    per_row = {k: (b[k] - a[k]) * MiB / (sizes["large"] - sizes["small"]) for k in b}
    assert max(per_row.values()) <= 72, (per_row, a, b)
