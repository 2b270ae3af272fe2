"""Does anchored mode's empirical default hold off digits? Damping multiplier x stopping rule.

Anchored mode damps an indefinite Hessian with delta = MULT * tr(H) / P (MULT = 4, picked on
digits models and a breast-cancer MLP) and stops growing its Lanczos basis when the complement's
curvature rho <= STOP * delta (STOP = 1/4). This script measures held-out LDS for MULT in
{4, 8, 16} and STOP in {1/8, 1/4, 1/2} on data sets that are not digits: scikit-learn's
breast cancer (two classes), wine (three), iris (three) and a synthetic 20-feature, 4-class
problem (``make_classification``), each with a 64-unit ReLU MLP trained by full-batch Adam on
mean CE + wd/2 ||theta||^2 (wd 1e-3), LDS against retrains on random 50% subsets from the same
init. Plain mode's LDS is the reference row.

The constants are module attributes of ``mirrorinf.engine.curvature``; the script sets them
for each cell (that is all it changes).

Run:  python benchmarks/anchored_defaults.py [--subsets 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MlpRecipe, lds_subsets, train_mlp

import mirrorinf.engine.curvature as curvature
from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.metrics import lds

RECIPE = MlpRecipe(weight_decay=1e-3, lr=1e-2, steps=500)
MULTS = (4.0, 8.0, 16.0)
STOPS = (0.125, 0.25, 0.5)


def dataset(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Standardised (x_train, y_train, x_query, y_query), float32, and the number of classes."""
    from sklearn import datasets

    if name == "synthetic":
        x, y = datasets.make_classification(
            600, 20, n_informative=10, n_classes=4, random_state=seed
        )
    else:
        loader = {
            "breast_cancer": datasets.load_breast_cancer,
            "wine": datasets.load_wine,
            "iris": datasets.load_iris,
        }[name]
        x, y = loader(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_q = max(30, len(y) // 5)
    tr, q = perm[n_q:], perm[:n_q]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs = (x - mu) / sd

    def t(i: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(xs[i], dtype=torch.float32), torch.tensor(y[i])

    return (*t(tr), *t(q), torch.tensor(int(y.max()) + 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=30, help="LDS retrains per data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="breast_cancer,wine,iris,synthetic")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# anchored-mode defaults off digits (seed {args.seed}, {args.subsets} half-subset "
        f"retrains, {torch.get_num_threads()} threads; default MULT 4, STOP 0.25)"
    )
    default_mult, default_stop = curvature._DAMPING_MULT, curvature._STOP
    header = "| data set | P | plain | " + " | ".join(
        f"x{m:g}, stop {s:g}" for m in MULTS for s in STOPS
    )
    print("\nLDS (basis size k, seconds) per cell\n")
    print(header + " |")
    print("|---|---:|---:|" + "---:|" * (len(MULTS) * len(STOPS)))
    try:
        for name in args.sets.split(","):
            x, y, xq, yq, n_out = dataset(name, args.seed)
            k_out = int(n_out)
            model = train_mlp(x, y, init_seed=args.seed, recipe=RECIPE, hidden=64, n_out=k_out)
            model.eval()
            masks, losses, _ = lds_subsets(
                x,
                y,
                xq,
                yq,
                args.subsets,
                seed=args.seed + 1,
                init_seed=args.seed,
                recipe=RECIPE,
                hidden=64,
                n_out=k_out,
            )
            n_params = sum(p.numel() for p in model.parameters())
            plain = ForwardInf(model).pairwise((x, y), (xq, yq)).double().numpy()
            cells = [f"{lds(plain, masks, losses):.3f}"]
            for mult in MULTS:
                for stop in STOPS:
                    curvature._DAMPING_MULT, curvature._STOP = mult, stop
                    cfg = ForwardInfConfig(mode="anchored", weight_decay=RECIPE.weight_decay)
                    fi = ForwardInf(model, cfg)
                    t0 = time.perf_counter()
                    s = fi.pairwise((x, y), (xq, yq)).double().numpy()
                    sec = time.perf_counter() - t0
                    k = fi.last_report.steps if fi.last_report else -1
                    cells.append(f"{lds(s, masks, losses):.3f} ({k}, {sec:.1f}s)")
            print(
                f"| {name} ({len(y)} train, {len(yq)} queries) | {n_params} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
    finally:
        curvature._DAMPING_MULT, curvature._STOP = default_mult, default_stop
    return 0


if __name__ == "__main__":
    sys.exit(main())
