"""Time of the review (``mirrorinf.review.write_report``): plots and report, per plot.

Builds review inputs shaped like the flow's (random scores through the real ``summarise``) on
two image sets: the demo's digits (800 x 8x8 grayscale, 40 queries, 5 leaks) and synthetic
3x32x32 colour images normalised with a per-channel mean/std (``data.image``), then times
``write_report`` (best of ``--repeat``) and each plot. The PNGs of the last run stay under
``--out`` to look at.

Run: OMP_NUM_THREADS=1 nice -n 5 python benchmarks/review_plots.py [--out /tmp/review-plots]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirrorinf import review  # noqa: E402
from mirrorinf.review import ReviewInputs, write_report  # noqa: E402
from mirrorinf.summary import summarise  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _digits() -> tuple[np.ndarray, np.ndarray, tuple[int, ...] | None, None]:
    """The demo's 8x8 digits, standardised per pixel as the demo's model sees them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, d.target, None, None


def _rgb(n: int = 840) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple]:
    """Colour 3x32x32 images (a bright disc of one of three colours on a dark gradient),
    normalised with ImageNet's mean/std."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 31.0
    y = rng.integers(0, 3, n)
    img = np.empty((n, 3, 32, 32), np.float32)
    for i in range(n):
        cy, cx, r = [*rng.uniform(0.3, 0.7, 2).tolist(), rng.uniform(0.15, 0.3)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[i] = 0.3 * yy[None] * rng.uniform(0.5, 1.0, (3, 1, 1))
        img[i, y[i]][disc] = 1.0
    flat = ((img - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).reshape(n, -1)
    return flat.astype(np.float32), y, (3, 32, 32), (list(MEAN), list(STD))


def inputs(name: str, n_train: int = 800, n_query: int = 40, n_leaks: int = 5) -> ReviewInputs:
    """Review inputs for ``name`` (digits | rgb) with random scores, planted leaks."""
    x, y, x_shape, norm = _digits() if name == "digits" else _rgb()
    rng = np.random.default_rng(1)
    train_x, query_x = x[:n_train], x[n_train : n_train + n_query].copy()
    query_x[:n_leaks] = train_x[:n_leaks]
    self_inf = np.exp(rng.normal(-6, 2, size=n_train))
    drop = np.full(n_query, 1e-3)
    pairwise = rng.normal(0, 1e-6, size=(n_train, n_query))
    for q in range(n_leaks):
        pairwise[q, q] = np.sqrt(self_inf[q] * drop[q])
    tables = summarise(
        pairwise, self_inf, rng.normal(0, 1e-3, size=n_train), train_labels=y[:n_train],
        query_ids=np.arange(n_query), query_self_drop=drop,
        calib_self_inf=np.exp(rng.normal(-7, 1, size=200)),
        calib_group_inf=rng.normal(0, 3e-4, size=200),
    )  # fmt: skip
    pred = y[:n_train].copy()
    pred[rng.random(n_train) < 0.1] = 0
    return ReviewInputs(
        tables=tables, train_x=train_x, query_x=query_x, query_ids=np.arange(n_query),
        query_labels=y[n_train : n_train + n_query], train_pred=pred, checks=[],
        verdict="passed", reasons=[], x_shape=x_shape, image_norm=norm,
        class_names=["red", "green", "blue"] if name == "rgb" else None,
    )  # fmt: skip


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``repeat`` calls (CPU time: steadier on a shared
    machine)."""
    times = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(times)


def main() -> None:
    """Print wall/CPU seconds of the whole review and of each gallery, per image set."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/review-plots"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for name in ("digits", "rgb"):
        inp = inputs(name)
        out = args.out / name
        total = _best(partial(write_report, out, inp), args.repeat)
        shape = review.image_shape(inp.train_x.shape[1], inp.x_shape)
        assert shape is not None
        scaled = ReviewInputs(**{**inp.__dict__, "scale": review.image_scale(inp, shape)})
        plots = ("mislabels", "leaks", "query_influence")
        parts = {
            p: _best(
                partial(getattr(review, f"plot_{p}"), scaled, shape, out / "t.png"), args.repeat
            )
            for p in plots
        }
        (out / "t.png").unlink()
        shown = "  ".join(f"{k} {w:.2f}s/{c:.2f}s" for k, (w, c) in parts.items())
        print(f"{name:7s} review {total[0]:.2f}s/{total[1]:.2f}s wall/CPU  (galleries: {shown})")


if __name__ == "__main__":
    main()
