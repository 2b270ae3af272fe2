"""Scale-out overhead: the sharded influence flow on threads vs a local Dask cluster.

Runs the whole flow (demo data, demo model, scoring in shards, checks, MLflow logging) twice in
one process against one temporary Prefect API, with the score cache off so both really score:
once with the thread-pool runner, once with prefect-dask on a LocalCluster. Prints wall times
and the ratio (target on 2 cores: Dask <= 1.3x threads). Dask pays process start-up and model /
data serialisation per shard; it wins when shards are heavy or workers are separate machines
(or one per GPU).

Run: python benchmarks/scaleout.py [--n-train 1200] [--shard 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirrorinf.tasks.env import set_tool_env  # noqa: E402

set_tool_env(ROOT)  # telemetry off, project-local Prefect home, before the tools load
from mirrorinf.flows.influence import run_influence  # noqa: E402
from mirrorinf.params import params_from_dict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-query", type=int, default=100)
    ap.add_argument("--shard", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=90):
        root = Path(tmp)
        base = {
            "demo": {"n_train": args.n_train, "n_val": 300, "n_query": args.n_query},
            "model": {"name": "scaleout"},
            "sharding": {"size": args.shard},
            "cache": False,
        }
        run_influence(params_from_dict(base, root=root))  # warm-up: data, model, imports

        def timed(label: str, runner: str, dask: dict, shard_dir: str) -> None:
            cfg = {
                **base,
                "runner": runner,
                "dask": dask,
                "sharding": {"size": args.shard, "dir": f"outputs/{shard_dir}"},
            }
            t0 = time.perf_counter()
            result = run_influence(params_from_dict(cfg, root=root))
            rows.append((label, time.perf_counter() - t0, result.stage_seconds.get("score", 0.0)))

        rows: list[tuple[str, float, float]] = []
        timed("threads", "threads", {}, "shards-threads")
        timed("dask, new LocalCluster per run", "dask", {"workers": args.workers}, "shards-cold")
        # the steady state: a cluster that is already up (dask.address), workers warmed by one run
        from distributed import LocalCluster
        from prefect.settings import PREFECT_API_URL

        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # before workers start
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster:  # fmt: skip
            warm = {"workers": args.workers, "address": cluster.scheduler_address}
            cfg = {
                **base,
                "runner": "dask",
                "dask": warm,
                "sharding": {"size": args.shard, "dir": "outputs/shards-warmup"},
            }
            run_influence(params_from_dict(cfg, root=root))
            timed("dask, running cluster (dask.address)", "dask", warm, "shards-warm")
    n_shards = -(-args.n_train // args.shard)
    print(
        f"# scale-out: {args.n_train} train x {args.n_query} queries, {n_shards} shards, "
        f"{os.cpu_count()} cores"
    )
    print("| runner | flow (s) | scoring stage (s) | flow vs threads |\n|---|---:|---:|---:|")
    for label, total, score in rows:
        print(f"| {label} | {total:.1f} | {score:.1f} | {total / rows[0][1]:.2f}x |")
    ratio = rows[2][1] / rows[0][1]
    print(
        f"\nDask (running cluster) / threads: {ratio:.2f}x "
        f"(target <= 1.3x: {'PASS' if ratio <= 1.3 else 'FAIL'}); a new LocalCluster adds its "
        f"start-up: {rows[1][1] / rows[0][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
