"""Where memory goes after scoring: the score matrix through cache, summary, logging and review.

Builds a score bundle of N x Q float32 scores (as the engine returns them; no engine run), then
runs the flow's own post-scoring steps on it: the signed score cache (save, then a verified
load), ``summarise`` (tables, flags, top-k, leak rule), MLflow logging into a temporary SQLite
store (``log_influence``) and the review (``log_review``: plots, report, UI tables). Prints the
peak of traced allocations (tracemalloc: numpy and Python) of each step, in MiB and as a multiple
of the float32 matrix, and the process's peak RSS.

Run: nice -n 5 python benchmarks/score_memory.py [--n 20000 200000] [--queries 100]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bundle(n: int, q: int) -> Any:
    """A bundle shaped like the engine's outputs (random scores, a few large self-influences)."""
    import numpy as np
    import torch

    from mirrorinf.tasks.score import ScoreBundle

    rng = np.random.default_rng(0)
    pairwise = torch.from_numpy(rng.standard_normal((n, q), dtype=np.float32))
    try:
        from mirrorinf.analysis import as_score_array
    except ImportError:  # before scores on disk: score_rows' float64 copy

        def as_score_array(t: Any) -> Any:
            return t.double().numpy()

    return ScoreBundle(
        pairwise=as_score_array(pairwise),
        self_influence=rng.gamma(2.0, 1.0, n),
        group_influence=rng.standard_normal(n),
        query_self_drop=rng.gamma(2.0, 1.0, q) + 1.0,
        calib_self_influence=rng.gamma(2.0, 1.0, 2000),
        calib_group_influence=rng.standard_normal(2000),
        reports={"pairwise": {"scale": 1.0}},
    )


def measure(n: int, q: int) -> list[tuple[str, float, float]]:
    """(step, traced peak MiB, seconds) per step at N x Q."""
    import numpy as np
    import torch

    from mirrorinf.tasks.checks import CheckResult
    from mirrorinf.tasks.data import Provenance, Split
    from mirrorinf.tasks.env import set_tool_env
    from mirrorinf.tasks.score import load_cached_scores, save_cached_scores

    rows: list[tuple[str, float, float]] = []

    def step(name: str, fn: Any) -> Any:
        tracemalloc.start()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rows.append((name, peak, seconds))
        return out

    with tempfile.TemporaryDirectory(prefix="mirrorinf-mem-") as tmp:
        root = Path(tmp)
        set_tool_env(root)
        from mirrorinf.summary import summarise, target_labels
        from mirrorinf.tasks.tracking import get_client, log_influence, log_review

        rng = np.random.default_rng(1)
        prov = Provenance(source="file", path="x.npz", md5="0" * 32)
        train = Split("train", torch.from_numpy(rng.standard_normal((n, 64), dtype=np.float32)),
                      torch.from_numpy(rng.integers(0, 10, n)), np.arange(n), prov)  # fmt: skip
        queries = Split("query", torch.from_numpy(rng.standard_normal((q, 64), dtype=np.float32)),
                        torch.from_numpy(rng.integers(0, 10, q)), np.arange(q), prov)  # fmt: skip
        bundle = step("engine output -> bundle", lambda: _bundle(n, q))
        cache = root / "cache"
        step("cache save", lambda: save_cached_scores(cache, "k", bundle))
        del bundle
        bundle = step("cache load (verified)", lambda: load_cached_scores(cache, "k"))
        tables = step("summarise", lambda: summarise(
            bundle.pairwise, bundle.self_influence, bundle.group_influence,
            train_ids=train.ids, train_labels=target_labels(train.y), query_ids=queries.ids,
            query_self_drop=bundle.query_self_drop, leak_pairwise=bundle.leak_pairwise,
            train_x=train.x.numpy(), query_x=queries.x.numpy(),
            calib_self_inf=bundle.calib_self_influence,
            calib_group_inf=bundle.calib_group_influence,
        ))  # fmt: skip
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        client = get_client(uri)
        exp = client.create_experiment("m", artifact_location=str(root / "mlruns" / "art"))
        run_id = client.create_run(exp).info.run_id
        check = CheckResult(success=True, results=[])
        step("log_influence", lambda: log_influence(
            uri, run_id, scores=bundle, tables=tables, check=check, metrics={"a": 1.0},
            summary={}, verdict="passed",
        ))  # fmt: skip
        step("log_review", lambda: log_review(
            uri, run_id, tables=tables, check=check, train=train, queries=queries,
            predicted=train.y.numpy(), verdict="passed", reasons=[],
        ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    for n in args.n:
        matrix = n * args.queries * 4 / 2**20
        rows = measure(n, args.queries)
        print(f"\nN = {n:,} x Q = {args.queries}: float32 matrix {matrix:.1f} MiB")
        print("| step | traced peak MiB | x matrix | seconds |")
        print("|---|---:|---:|---:|")
        for name, peak, seconds in rows:
            print(f"| {name} | {peak:.1f} | {peak / matrix:.2f} | {seconds:.2f} |")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"process peak RSS so far: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
