"""Peak memory of loading and scoring a large .npz: the streaming path against a whole load.

Writes an uncompressed .npz of N x D float32 features (default 1M x 64 = 256 MB) and integer
labels once, then in a fresh child process: ``load_dataset`` (the pipeline's loader), then
pairwise influence on a few queries and self-influence with a small MLP (the engine reading the
split as the pipeline passes it: ``Split.examples()`` where it exists, else ``Split.pair()``).
It prints the child's peak RSS (``ru_maxrss``), and peaks of its anonymous memory and of its
file-backed resident pages (sampled from /proc/self/status every 5 ms): memory-mapped file pages
count in RSS while touched but are page cache the kernel can drop, anonymous memory is not.

With ``--dvc`` the .npz is tracked by DVC in a git + DVC repository in a temp folder (tag v1)
and loaded as the pipeline reads ``data.rev``: ``load_dataset(..., source="dvc", rev="v1")``.

Run: nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/stream_memory.py [--n 1000000] [--dvc]
(run it with another checkout's interpreter to measure that code: the child imports mirrorinf
from whatever the interpreter has installed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _status() -> dict[str, float]:
    """RssAnon / RssFile of this process, MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def _child(path: str, queries: int, repo: str | None = None) -> dict[str, Any]:
    """Load + score in this process; peaks of RSS, anonymous and file-backed memory."""
    import torch

    from mirrorinf import ForwardInf
    from mirrorinf.tasks.data import load_dataset

    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status().items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.005)

    base = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if repo:
        train = load_dataset(path, name="train", source="dvc", repo=repo, rev="v1")
    else:
        train = load_dataset(path, name="train")
    t_load = time.perf_counter() - t0
    after_load = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **peaks}
    torch.manual_seed(0)
    d = int(train.read(0, 1).shape[1]) if hasattr(train, "read") else int(train.x.shape[1])
    model = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    data = train.examples() if hasattr(train, "examples") else train.pair()
    q_x = train.read(0, queries) if hasattr(train, "read") else train.x[:queries]
    q = (q_x.clone() + 0.01, train.y[:queries].clone())
    fi = ForwardInf(model, {"train_batch": 8192})
    t1 = time.perf_counter()
    pairwise = fi.pairwise(data, q)
    selfinf = fi.self_influence(data)
    t_score = time.perf_counter() - t1
    stop.set()
    sampler.join()
    return {
        "n": len(train),
        "load_s": round(t_load, 2),
        "score_s": round(t_score, 2),
        "base_anon_mb": round(base["RssAnon"], 1),
        "load_peak_rss_mb": round(after_load["maxrss"], 1),
        "load_peak_anon_mb": round(after_load["RssAnon"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_anon_mb": round(peaks["RssAnon"], 1),
        "peak_file_mb": round(peaks["RssFile"], 1),
        "checksum": float(pairwise.double().sum() + selfinf.double().sum()),
    }


def child_json(cmd: list[str]) -> dict[str, Any]:
    """Run a benchmark's child process (one thread unless OMP_NUM_THREADS says otherwise) and
    return the JSON object on its last line; exit with its stderr when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _dvc_repo(data: Path) -> Path:
    """A git + DVC repository (temp folder, kept for reruns) tracking a copy of ``data`` at tag
    v1, its object in the local DVC cache."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dvc_helpers import dvc_add_commit, make_dvc_repo

    repo = data.with_suffix(".dvc-repo")
    if not (repo / f"{data.name}.dvc").is_file():
        shutil.rmtree(repo, ignore_errors=True)
        make_dvc_repo(repo)
        shutil.copy(data, repo / data.name)
        dvc_add_commit(repo, [data.name], "v1", tag="v1")
    return repo


def main() -> None:
    """Write the data once, run the child, print its numbers as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--file", type=Path, help="the .npz to use (written when missing)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the child")
    ap.add_argument("--dvc", action="store_true", help="load it from a DVC repo at a revision")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.queries, args.repo)))
        return
    import numpy as np

    path = args.file or Path(tempfile.gettempdir()) / f"mirrorinf-stream-{args.n}x{args.d}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.n, args.d), dtype=np.float32)
        y = rng.integers(0, 10, args.n)
        np.savez(path, x=x, y=y)
        del x, y
    cmd = [args.python, __file__, "--child", str(path), "--queries", str(args.queries)]
    if args.dvc:
        repo = _dvc_repo(path)
        cmd[3:4] = [path.name, "--repo", str(repo)]
    row = child_json(cmd)
    row["file_mb"] = round(path.stat().st_size / 2**20, 1)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
