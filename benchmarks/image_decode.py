"""Decode time of an image folder over a run's passes: images decoded on every pass (before)
against once per run into uint8 pixels kept in a memory-mapped temporary file (now).

Writes a folder of N 32x32 RGB PNGs in 10 classes once, then in a fresh child process:
``load_dataset`` (the pipeline's loader; its validation pass reads every image), three full
passes over the split in training batches as the engine reads it (pairwise, group and
self-influence each make one), and pairwise + self-influence of a small MLP on 10 queries
through ``score_rows``' engine. Prints seconds per step and a checksum of the scores.

Run: nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/image_decode.py [--n 4000]
     [--python OTHER_CHECKOUT/.venv/bin/python]   (measures the code that interpreter imports)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _child(root: str, passes: int, batch: int) -> dict[str, Any]:
    """Load, read every row ``passes`` times, score; seconds of each."""
    import torch

    from mirrorinf import ForwardInf
    from mirrorinf.tasks.data import load_dataset

    t0 = time.perf_counter()
    split = load_dataset(root, name="train")
    out: dict[str, Any] = {"n": len(split), "load_s": round(time.perf_counter() - t0, 2)}
    reader = split.reader
    assert reader is not None
    for k in range(passes):
        t = time.perf_counter()
        rows = sum(len(y) for _, y in reader.batches(batch, 0, len(split)))
        assert rows == len(split)
        out[f"pass{k + 1}_s"] = round(time.perf_counter() - t, 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
    )  # fmt: skip
    x, y = reader.read(0, 10)
    fi = ForwardInf(model, {"train_batch": batch})
    t = time.perf_counter()
    pairwise = fi.pairwise(split.examples(), (x + 0.01, y))
    selfinf = fi.self_influence(split.examples())
    out["score_s"] = round(time.perf_counter() - t, 2)
    out["checksum"] = float(pairwise.double().sum() + selfinf.double().sum())
    return out


def _write(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png"
        )


def main() -> None:
    """Write the folder once, run the child, print its numbers as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--root", type=Path, help="the image folder (written when missing)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the child")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.passes, args.batch)))
        return
    root = args.root or Path(tempfile.gettempdir()) / f"mirrorinf-images-{args.n}"
    if not root.exists():
        _write(root, args.n)
    from stream_memory import child_json

    cmd = [args.python, __file__, "--child", str(root), "--passes", str(args.passes)]
    print(json.dumps(child_json([*cmd, "--batch", str(args.batch)]), indent=1))


if __name__ == "__main__":
    main()
