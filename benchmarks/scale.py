"""Scale: the whole influence flow (``run_influence``) against the engine alone, N = 10k .. 1M.

Synthetic 64-feature data (10 classes from a random linear teacher, 5% flipped labels), an MLP
64-256-256-10 briefly trained and logged to a temporary SQLite MLflow store as pt2 (the way
users log models, and the way the pipeline loads them), 2,000 validation rows, 100 queries.
For each N, two fresh child processes (so peak RSS is that run's alone):
- ``flow``: ``run_influence`` (Prefect test harness, cache on, threads runner): wall time, the
  flow's stage timings (``InfluenceResult.stage_seconds``, also logged as ``stage_seconds.*``
  run metrics), peak RSS (``ru_maxrss``) and its part above the RSS before the flow started,
  peak anonymous RSS (sampled every 20 ms: RSS without the file-backed pages of the
  memory-mapped data and score files, which the kernel can drop), and the bytes logged to the
  run's artifacts;
- ``bare``: the engine alone on the same rows and the same loaded model (pairwise + group +
  self-influence via ``mirrorinf.analysis.score_rows``, no tools), writing the score matrix
  into a file as the flow does (``ForwardInf.pairwise_into``): its seconds and peak RSS.
The parent prints one table and the growth exponents (least-squares slope of log y on log N).

Run: nice -n 5 env OMP_NUM_THREADS=2 python benchmarks/scale.py [--n 10000 100000] [--full]
(--full adds N = 1,000,000; --json FILE writes the rows.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES, N_CLASSES, N_VAL, SEED = 64, 10, 2000, 0


def _rss_mb() -> float:
    """Peak RSS of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: less sensitive than wall time to
    other work on a shared machine (threads of this process add up)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _current_rss_mb() -> float:
    """Current RSS of this process, MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _anon_mb() -> float:
    """Current anonymous RSS of this process, MiB: memory the process owns, without the
    file-backed pages of memory-mapped data and scores (reclaimable page cache that RSS counts)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak anonymous RSS while the block runs, sampled every 20 ms in a daemon thread."""

    def __init__(self) -> None:
        self.before = self.peak = _anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _anon_mb())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())


def _data(n: int, n_query: int) -> dict[str, dict[str, Any]]:
    """Train / val / query splits of the synthetic task (float32 x, int64 y)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    teacher = rng.standard_normal((N_FEATURES, N_CLASSES)).astype(np.float32)
    out = {}
    for name, rows in (("train", n), ("val", N_VAL), ("query", n_query)):
        x = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
        y = (x @ teacher).argmax(axis=1).astype(np.int64)
        if name == "train":
            flip = rng.random(rows) < 0.05
            y[flip] = rng.integers(0, N_CLASSES, int(flip.sum()))
        out[name] = {"x": x, "y": y}
    return out


def _model(train: dict[str, Any]) -> Any:
    """MLP 64-256-256-10, 300 Adam steps on batches of the training rows."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(N_FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, N_CLASSES),
    )  # fmt: skip
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(300):
        idx = torch.randint(0, len(y), (256,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def _register(project: Path, model: Any, example: Any) -> str:
    """Log the model as pt2 and register it as "scale" v1; returns the tracking URI."""
    import mlflow
    import mlflow.pytorch

    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    (project / "mlruns").mkdir()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("train", str(project / "mlruns" / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        mlflow.pytorch.log_model(
            model, name="model", registered_model_name="scale", input_example=example,
            pip_requirements=["torch"],
        )  # fmt: skip
    return uri


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child_flow(n: int, n_query: int, threads: int) -> dict[str, Any]:
    """One whole flow at N training rows; its measurements."""
    sys.path.insert(0, str(ROOT))
    from mirrorinf.tasks.env import set_tool_env

    with tempfile.TemporaryDirectory(prefix="mirrorinf-scale-") as tmp:
        project = Path(tmp)
        set_tool_env(project)
        import numpy as np
        from prefect.testing.utilities import prefect_test_harness

        from mirrorinf.flows.influence import run_influence
        from mirrorinf.params import params_from_dict
        from mirrorinf.tasks.tracking import get_client

        splits = _data(n, n_query)
        for name, arrays in splits.items():
            np.savez(project / f"{name}.npz", **arrays)
        _register(project, _model(splits["train"]), splits["train"]["x"][:2])
        del splits
        params = {
            "data": {"source": "file", "train": "train.npz", "val": "val.npz",
                     "query": "query.npz"},
            "model": {"name": "scale", "version": 1},
            "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "scale"},
            "queries": {"max_queries": n_query},
            "threads": threads,
        }  # fmt: skip
        with prefect_test_harness(server_startup_timeout=120):
            rss_before = _current_rss_mb()
            t0, c0 = time.perf_counter(), _cpu_s()
            with AnonPeak() as anon:
                result = run_influence(params_from_dict(params, root=project))
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            client = get_client(f"sqlite:///{project}/mlruns/mlflow.db")
            run = client.get_run(result.run_id)
            art = Path(run.info.artifact_uri.removeprefix("file://"))
            logged = _dir_bytes(art) if art.is_dir() else -1
        return {
            "n": n,
            "wall_s": wall,
            "cpu_s": cpu,
            "stages": result.stage_seconds,
            "rss_before_mb": rss_before,
            "peak_rss_mb": _rss_mb(),
            "anon_before_mb": anon.before,
            "peak_anon_mb": anon.peak,
            "logged_mb": logged / 2**20,
            "verdict": result.verdict,
            "reasons": result.reasons,
        }


def child_bare(n: int, n_query: int, threads: int) -> dict[str, Any]:
    """The engine alone (pairwise + group + self) on the same rows and the pt2-loaded model."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    from mirrorinf.tasks.env import set_tool_env

    with tempfile.TemporaryDirectory(prefix="mirrorinf-scale-") as tmp:
        project = Path(tmp)
        set_tool_env(project)
        from mirrorinf import ForwardInf
        from mirrorinf.analysis import score_rows
        from mirrorinf.integrity import SignedRecords
        from mirrorinf.tasks.model import load_registered_model

        splits = _data(n, n_query)
        uri = _register(project, _model(splits["train"]), splits["train"]["x"][:2])
        model, _ = load_registered_model("scale", 1, tracking_uri=uri)
        t = {k: (torch.from_numpy(v["x"]), torch.from_numpy(v["y"])) for k, v in splits.items()}
        rss_before = _current_rss_mb()
        fi = ForwardInf(model)
        t0, c0 = time.perf_counter(), _cpu_s()
        records = SignedRecords(project / "scores", "scores")
        _, reports = score_rows(
            fi, t["train"], t["query"], t["val"],
            out=lambda name, shape: records.new_array("bare", name, shape, "float32"),
        )  # fmt: skip
        bare, bare_cpu = time.perf_counter() - t0, _cpu_s() - c0
        pairwise_s = float(reports["pairwise"]["seconds"])
        return {
            "n": n,
            "bare_s": bare,
            "bare_cpu_s": bare_cpu,
            "pairwise_s": pairwise_s,
            "bare_rss_before_mb": rss_before,
            "bare_peak_rss_mb": _rss_mb(),
        }


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (the growth exponent); NaN with < 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var


def _spawn(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n),
           "--queries", str(args.queries), "--threads", str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {mode} N={n} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


STAGES = ("model", "data", "score", "score.pairwise", "score.group", "score.self",
          "score.calibration", "score.store", "check", "check.summary", "check.gx_import",
          "check.gx", "logging", "review", "publish")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--full", action="store_true", help="also N = 1,000,000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--child", choices=("flow", "bare"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = child_flow if args.child == "flow" else child_bare
        print(json.dumps(fn(args.n[0], args.queries, args.threads)), flush=True)
        return
    sizes = sorted({*args.n, *([1_000_000] if args.full else [])})
    rows = []
    for n in sizes:
        row = {**_spawn("flow", n, args), **_spawn("bare", n, args)}
        row["ratio"] = row["wall_s"] / row["bare_s"]
        row["cpu_ratio"] = row["cpu_s"] / row["bare_cpu_s"]
        rows.append(row)
        print(f"N={n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print(f"\n{args.queries} queries, {N_FEATURES} features, MLP 64-256-256-10 (pt2), "
          f"{args.threads} threads\n")  # fmt: skip
    print("| N | flow s (CPU s) | engine s (CPU s; pairwise s) | flow / engine, wall (CPU) "
          "| peak RSS MB (above start) | peak anonymous MB (above start) | engine peak RSS MB "
          "| logged MB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['wall_s']:.1f} ({r['cpu_s']:.0f}) | {r['bare_s']:.1f} "
              f"({r['bare_cpu_s']:.0f}; {r['pairwise_s']:.1f}) | {r['ratio']:.2f} "
              f"({r['cpu_ratio']:.2f}) | {r['peak_rss_mb']:.0f} "
              f"({r['peak_rss_mb'] - r['rss_before_mb']:.0f}) | {r['peak_anon_mb']:.0f} "
              f"({r['peak_anon_mb'] - r['anon_before_mb']:.0f}) | {r['bare_peak_rss_mb']:.0f} | "
              f"{r['logged_mb']:.1f} |")  # fmt: skip
    names = [s for s in STAGES if any(s in r["stages"] for r in rows)]
    names += sorted({k for r in rows for k in r["stages"]} - set(names))
    print("\nStage seconds (flow):\n")
    print("| N | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['n']:,} | " + " | ".join(f"{r['stages'].get(s, 0):.2f}" for s in names)
              + " |")  # fmt: skip
    ns = [r["n"] for r in rows]
    print("\nGrowth exponents (slope of log y on log N; 1 = linear, 0 = flat):")
    for label, key in (("flow time", "wall_s"), ("flow CPU", "cpu_s"), ("engine time", "bare_s"),
                       ("engine CPU", "bare_cpu_s"), ("peak RSS", "peak_rss_mb"),
                       ("logged bytes", "logged_mb")):  # fmt: skip
        print(f"  {label}: {_slope(ns, [r[key] for r in rows]):.2f}")
    above = [r["peak_rss_mb"] - r["rss_before_mb"] for r in rows]
    print(f"  RSS above start: {_slope(ns, above):.2f}")
    anon = [r["peak_anon_mb"] - r["anon_before_mb"] for r in rows]
    print(f"  anonymous memory above start: {_slope(ns, anon):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
