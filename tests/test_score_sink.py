"""Scores written where they are stored: the engine fills a score matrix on disk one batch at a
time (``ForwardInf.pairwise_into``), with the in-memory path's exact values, without ever
holding the [n_train, n_query] matrix; the flow's cache and shards are written that way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.analysis import score_rows
from mirrorinf.integrity import SignedRecords
from mirrorinf.shards import ShardStore, shard_ranges
from mirrorinf.tasks.data import Provenance, Split
from mirrorinf.tasks.score import compute_scores, load_cached_scores, score_shard_task, score_task

ROOT = Path(__file__).resolve().parents[1]


class _Normed(nn.Module):
    """Not all-Linear (LayerNorm): the generic path."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.n(self.a(x))))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def _normed() -> nn.Module:
    torch.manual_seed(0)
    return _Normed().eval()


CASES = {
    # rank-1 fast path, queries in chunks and training rows in batches that do not divide them
    "lowrank": (_mlp, {"query_batch": 5, "train_batch": 64}),
    "generic": (_normed, {"query_batch": 7, "train_batch": 50}),
    "ascent_abs_fixed_lr": (_normed, {"direction": "ascent", "score": "abs", "lr": 0.01}),
    "anchored": (_mlp, {"mode": "anchored", "query_batch": 8, "train_batch": 70}),
    # every column vanishes at float32: recomputed in float64, into the same output
    "float64_redo": (_mlp, {"rel_step": 1e-9, "query_batch": 8}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pairwise_into_a_file_equals_the_in_memory_scores(case: str, tmp_path: Path) -> None:
    make, cfg = CASES[case]
    train, queries = _data(300, 0), _data(37, 1)
    fi = ForwardInf(make(), ForwardInfConfig(**cfg), device="cpu")
    want = fi.pairwise(train, queries).numpy()
    want_report = fi.last_report.to_dict()
    out = SignedRecords(tmp_path, "scores").new_array("k", "pairwise", (300, 37), np.float32)
    report = ForwardInf(make(), ForwardInfConfig(**cfg), device="cpu").pairwise_into(
        train, queries, out
    )
    out.close()
    got = np.load(out.path, allow_pickle=False)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    got_report = report.to_dict()
    for rep in (got_report, want_report):
        rep.pop("seconds")
    assert json.dumps(got_report, default=str) == json.dumps(want_report, default=str)
    if case == "float64_redo":
        assert report.upcast == 37
        mapped = np.lib.format.open_memmap(tmp_path / "s.npy", "w+", np.float32, (300, 37))
        fi.pairwise_into(train, queries, mapped)  # the README's way: any array with slices
        assert np.asarray(mapped).tobytes() == want.tobytes()
    with pytest.raises(ValueError, match=r"need \(300, 37\)"):
        fi.pairwise_into(train, queries, np.empty((300, 36), np.float32))


_PEAK = """
import json, sys
import numpy as np, torch
from torch import nn
from mirrorinf import ForwardInf
from mirrorinf.integrity import SignedRecords

torch.set_num_threads(1)
n, q, into = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
x, y = torch.randn(n, 8), torch.randint(0, 3, (n,))
xq, yq = torch.randn(q, 8), torch.randint(0, 3, (q,))
fi = ForwardInf(model, {"query_batch": q, "train_batch": 1024}, device="cpu")
fi.pairwise((x[:2048], y[:2048]), (xq, yq))  # warm: kernels, caches, the path's check
def status(field):
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as fh:  # the high-water mark restarts from here
    fh.write("5")
before = status("VmRSS")
if into == "file":
    out = SignedRecords(sys.argv[4], "scores").new_array("k", "pairwise", (n, q), np.float32)
    fi.pairwise_into((x, y), (xq, yq), out)
else:
    out = fi.pairwise((x, y), (xq, yq))
print(json.dumps({"rise": status("VmHWM") - before}))
"""


def _peak_rise(tmp_path: Path, n: int, q: int, into: str) -> int:
    """Peak RSS above the start of one pairwise call, in a fresh process (bytes)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(n), str(q), into, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rise"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_engine_writing_to_a_file_never_holds_the_matrix(tmp_path: Path) -> None:
    """200k x 64 scores (49 MiB as float32): written into a file, the call's peak RSS rises by
    a small part of the matrix (batches, base losses); the in-memory call holds at least the
    float32 result (before this change: float64 copies too, 6x the result)."""
    n, q = 200_000, 64
    matrix = n * q * 4
    to_file = _peak_rise(tmp_path, n, q, "file")
    assert to_file < 0.25 * matrix, f"writing to a file rose {to_file / 2**20:.1f} MiB"
    in_memory = _peak_rise(tmp_path, n, q, "memory")
    assert in_memory >= 0.9 * matrix, f"the in-memory call rose {in_memory / 2**20:.1f} MiB"
    out = np.load(tmp_path / next(p.name for p in tmp_path.iterdir()), mmap_mode="r")
    assert out.shape == (n, q) and bool(np.isfinite(out[::997]).all())


def _split(name: str, n: int, seed: int) -> Split:
    x, y = _data(n, seed)
    return Split(name, x, y, np.arange(n), Provenance("file", f"{name}.npz", f"md5-{name}"))


def test_cache_written_by_the_engine_equals_the_in_memory_scoring(tmp_path: Path) -> None:
    """score_task's cache record (the engine wrote its matrix in place) holds exactly the
    in-memory computation's scores and reports; a failed scoring leaves no record and no
    temporary file."""
    train, val, queries = _split("train", 300, 0), _split("val", 60, 2), _split("query", 11, 1)
    cfg = ForwardInfConfig(query_batch=4, train_batch=64)
    want = compute_scores(_mlp(), train, val, queries, cfg, "cpu")
    stale = tmp_path / ".key1.pairwise.npy.killed.tmp"  # a killed run's half-written matrix
    stale.write_bytes(b"half")
    got, hit = score_task.fn("key1", _mlp(), train, val, queries, cfg, "cpu", str(tmp_path))
    assert not hit and isinstance(got.pairwise, np.memmap) and not stale.exists()
    assert got.pairwise.tobytes() == want.pairwise.tobytes()
    for name in ("self_influence", "group_influence", "query_self_drop"):
        assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name
    cached = load_cached_scores(tmp_path, "key1")
    assert cached is not None and cached.pairwise.tobytes() == want.pairwise.tobytes()

    class Fails(nn.Module):
        """Fails on the training rows after the first batches were written."""

        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = _mlp(), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 32:  # a training batch (queries come in chunks of 4)
                self.calls += 1
                if self.calls > 6:
                    raise RuntimeError("device lost")
            return self.net(x)

    with pytest.raises(RuntimeError, match="device lost"):
        score_task.fn("key2", Fails(), train, val, queries, cfg, "cpu", str(tmp_path))
    assert not SignedRecords(tmp_path, "scores").exists("key2")
    assert sorted(p.name for p in tmp_path.iterdir() if "key2" in p.name) == []


def test_shards_written_by_the_engine_equal_their_in_memory_scoring(tmp_path: Path) -> None:
    """Each shard's matrix, written in place by the engine, and the assembled record equal the
    in-memory scoring of the same rows exactly."""
    train, val, queries = _split("train", 250, 0), _split("val", 40, 2), _split("query", 9, 1)
    cfg = ForwardInfConfig(query_batch=4, train_batch=32)
    ident = {"scores": "k", "shard_size": 100}
    store = ShardStore(tmp_path / "s", ident).open()
    ranges = shard_ranges(len(train), 100)
    for a, b in ranges:
        assert score_shard_task.fn(
            str(store.root), ident, a, b, _mlp(), train, val, queries, cfg, "cpu"
        )
    parts = []
    for a, b in ranges:
        fi = ForwardInf(_mlp(), cfg, device="cpu")
        part = (train.x[a:b], train.y[a:b])
        rows, _ = score_rows(fi, part, queries.pair(), val.pair(), curvature=train.pair())
        assert store.load(a, b)["pairwise"].tobytes() == rows["pairwise"].tobytes()
        parts.append(rows)
    assembled, reports = store.assemble_with_reports(ranges)
    whole = np.concatenate([p["pairwise"] for p in parts])
    assert assembled["pairwise"].tobytes() == whole.tobytes()
    assert reports["pairwise"]["n_train"] == len(train)
