"""Throughput: pairwise scoring time vs the bare limit of m plain forward passes.

The bare limit is m forward passes of the same model over the whole training set in plain torch
(inference mode) at its best batch size among several. Forward-INF needs at least that much work
for m queries unless it shares it; the ratio printed is engine time / bare limit (target <= 1.2).
Also: self-influence time over N vs one forward+backward pass over N, and peak RSS at N and 4N.

Run: python benchmarks/throughput.py [--n 20000] [--queries 32] [--device auto]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from mirrorinf import ForwardInf, ForwardInfConfig


def make_model(d_in: int, width: int, n_cls: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, n_cls),
    )


def make_data(n: int, d_in: int, n_cls: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, n_cls, (n,), generator=g)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def bare_limit(
    model: nn.Module, x: torch.Tensor, m: int, device: torch.device, repeats: int
) -> tuple[float, int, dict[int, float]]:
    """Best time of m inference-mode forward passes over x, over several batch sizes."""
    model = model.to(device).eval()
    xd = x.to(device)
    per_bs: dict[int, float] = {}
    for bs in (256, 1024, 4096, 16384):

        def run(bs: int = bs) -> None:
            with torch.inference_mode():
                for _ in range(m):
                    for s in range(0, len(xd), bs):
                        model(xd[s : s + bs])

        run()  # warm-up
        per_bs[bs] = best_of(run, repeats, device)
    best = min(per_bs, key=per_bs.__getitem__)
    return per_bs[best], best, per_bs


def fwd_bwd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    repeats: int,
    bs: int = 4096,
) -> float:
    model = model.to(device)
    xd, yd = x.to(device), y.to(device)

    def run() -> None:
        for s in range(0, len(xd), bs):
            loss = nn.functional.cross_entropy(model(xd[s : s + bs]), yd[s : s + bs])
            loss.backward()

    run()
    return best_of(run, repeats, device)


def peak_rss_child(n: int, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process that builds n training points and scores them."""
    code = (
        "import resource, sys; sys.path.insert(0, '.');"
        "from benchmarks.throughput import make_model, make_data;"
        "from mirrorinf import ForwardInf;"
        f"m = make_model({args.d_in}, {args.width}, {args.classes});"
        f"x, y = make_data({n}, {args.d_in}, {args.classes});"
        f"xq, yq = make_data({args.queries}, {args.d_in}, {args.classes}, seed=1);"
        "ForwardInf(m, device='cpu').pairwise((x, y), (xq, yq));"
        # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at the parent's peak
        "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
        " / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS-vs-N measurement")
    args = ap.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    model = make_model(args.d_in, args.width, args.classes)
    x, y = make_data(args.n, args.d_in, args.classes)
    xq, yq = make_data(args.queries, args.d_in, args.classes, seed=1)
    m = args.queries
    print(
        f"# throughput: MLP {args.d_in}-{args.width}-{args.width}-{args.classes}, "
        f"N={args.n}, m={m}, device={device}, torch threads={torch.get_num_threads()}"
    )

    bare, bare_bs, per_bs = bare_limit(model, x, m, device, args.repeats)
    print("\nbare limit (m plain forward passes over N, inference mode):")
    print("| batch size | seconds |\n|---:|---:|")
    for bs, t in per_bs.items():
        print(f"| {bs} | {t:.3f}{' (best)' if bs == bare_bs else ''} |")

    rows = []
    for label, cfg in [
        ("pairwise, default", ForwardInfConfig()),
        ("pairwise, generic path", ForwardInfConfig(fast_path="off")),
    ]:
        fi = ForwardInf(model, cfg, device=device)
        fi.pairwise((x, y), (xq[:2], yq[:2]))  # warm-up + base-loss cache, as in a real run

        def run(fi: ForwardInf = fi) -> None:
            fi.pairwise((x, y), (xq, yq))

        t = best_of(run, args.repeats, device)
        rows.append((label, fi.last_report.path, t, t / bare))

    fb = fwd_bwd(model, x, y, device, args.repeats)
    fi = ForwardInf(model, device=device)
    t_self = best_of(lambda: fi.self_influence((x, y)), args.repeats, device)

    print("\n| what | path | seconds | ratio to bare limit |\n|---|---|---:|---:|")
    for label, path, t, r in rows:
        print(f"| {label} | {path} | {t:.3f} | {r:.2f} |")
    print(
        f"\nself-influence over N: {t_self:.3f} s; one forward+backward over N: {fb:.3f} s; "
        f"ratio {t_self / fb:.2f}"
    )
    target = rows[0][3]
    print(
        f"\ntarget pairwise <= 1.2x bare limit: {'PASS' if target <= 1.2 else 'FAIL'} "
        f"({target:.2f}x)"
    )

    if not args.no_rss and device.type == "cpu":
        gc.collect()
        r1 = peak_rss_child(args.n, args)
        r4 = peak_rss_child(4 * args.n, args)
        data_mb = 4 * args.n * (args.d_in + 2) * 4 / 2**20
        extra = 3 * args.n * (args.d_in + 2) * 4 / 2**20 + 3 * args.n * m * 12 / 2**20
        print(
            f"\npeak RSS of a process scoring N={args.n}: {r1:.0f} MB; 4N={4 * args.n}: "
            f"{r4:.0f} MB; difference {r4 - r1:.0f} MB, of which the extra 3N of data and "
            f"scores account for {extra:.0f} MB (4N data alone {data_mb:.0f} MB)"
        )
    print(f"\nprocess max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
