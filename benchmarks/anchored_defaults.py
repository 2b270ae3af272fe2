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

Seeds and derived rules (``--seeds 3 --mults 1,2,4,8,16,32 --stops 0.25 --rules``): each
seed draws its own split, init and retrain subsets; every (set, seed) is one case, and the
summary gives each column's mean LDS over the cases and its regret (the case's best multiplier
on the grid minus the column's LDS, mean and max). Two rules that would derive delta from the
model and data instead of a multiplier, each run at the default stop:

* ``ray-g``: the Rayleigh quotient g'Hg / g'g of the trained model's full-batch gradient g of
  the training objective. Where training has converged g is near 0; what remains lies in the
  directions it had not finished (gradient descent for T steps of lr eta leaves those with
  curvature below about 1 / (eta T), the implicit ridge of early stopping), so their curvature
  is the scale below which the trained weights do not answer the data.
* ``deff-n/2``: the delta at which the effective dimension sum_j |l_j| / (|l_j| + delta) of the
  exact Hessian spectrum is n/2 (n training rows can determine about that many directions);
  P <= 4000 only (the exact Hessian takes P Hessian-vector products).

Run:  python benchmarks/anchored_defaults.py [--subsets 30] [--threads 1] [--seeds 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MlpRecipe, lds_subsets, objective, train_mlp

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


def _flat_grad(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(params, flat gradient of the training objective with its graph kept)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(
        objective(model, x, y, RECIPE.weight_decay), params, create_graph=True
    )
    return params, torch.cat([g.reshape(-1) for g in grads])


def _hvp(params: list[torch.Tensor], grad: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.autograd.grad(grad, params, v, retain_graph=True)
    return torch.cat([t.reshape(-1) for t in out])


def ray_g_damping(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """g'Hg / g'g for the full-batch gradient g of the objective at the trained weights."""
    params, grad = _flat_grad(model, x, y)
    g = grad.detach()
    return float(g @ _hvp(params, grad, g)) / float(g @ g)


def deff_damping(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """delta with sum |l| / (|l| + delta) = n / 2 on the exact spectrum; None when P > 4000."""
    params, grad = _flat_grad(model, x, y)
    n_params = grad.numel()
    if n_params > 4000:
        return None
    eye = torch.eye(n_params, dtype=grad.dtype)
    hess = torch.stack([_hvp(params, grad, eye[i]) for i in range(n_params)]).double()
    lam = torch.linalg.eigvalsh((hess + hess.T) / 2).abs()
    target, lo, hi = len(y) / 2, 1e-12, 1e6 * float(lam.max())
    for _ in range(200):  # bisection in log space: d_eff falls as delta grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if float((lam / (lam + mid)).sum()) > target else (lo, mid)
    return math.sqrt(lo * hi)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=30, help="LDS retrains per data set")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="seeds seed, seed+1, ... per set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="breast_cancer,wine,iris,synthetic")
    ap.add_argument("--mults", type=_floats, default=MULTS, help="damping multipliers")
    ap.add_argument("--stops", type=_floats, default=STOPS, help="stopping fractions")
    ap.add_argument("--rules", action="store_true", help="add the ray-g and deff-n/2 rules")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# anchored-mode defaults off digits (seeds {args.seed}..{args.seed + args.seeds - 1}, "
        f"{args.subsets} half-subset retrains, {torch.get_num_threads()} threads; default "
        f"MULT {curvature._DAMPING_MULT:g}, STOP {curvature._STOP:g})"
    )
    default_mult, default_stop = curvature._DAMPING_MULT, curvature._STOP
    columns = [f"x{m:g}, stop {s:g}" for m in args.mults for s in args.stops]
    columns += ["ray-g", "deff-n/2"] if args.rules else []
    print("\nLDS (basis size k, seconds; rules: delta / (tr(H)/P)) per cell\n")
    print("| data set | seed | P | plain | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(columns))
    cases: list[dict[str, float]] = []
    try:
        for name in args.sets.split(","):
            for seed in range(args.seed, args.seed + args.seeds):
                cases.append(_case(name, seed, args, columns))
    finally:
        curvature._DAMPING_MULT, curvature._STOP = default_mult, default_stop
    _summary(cases, ["plain", *columns], [c for c in columns if c.startswith("x")])
    return 0


def _case(name: str, seed: int, args: argparse.Namespace, columns: list[str]) -> dict[str, float]:
    """One (set, seed): prints its row, returns LDS per column."""
    x, y, xq, yq, n_out = dataset(name, seed)
    k_out = int(n_out)
    model = train_mlp(x, y, init_seed=seed, recipe=RECIPE, hidden=64, n_out=k_out)
    model.eval()
    masks, losses, _ = lds_subsets(
        x, y, xq, yq, args.subsets, seed=seed + 1, init_seed=seed, recipe=RECIPE, hidden=64,
        n_out=k_out,
    )  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    plain = ForwardInf(model).pairwise((x, y), (xq, yq)).double().numpy()
    out = {"plain": lds(plain, masks, losses)}
    cells = [f"{out['plain']:.3f}"]

    def anchored(damping: float | None) -> tuple[float, int, float]:
        cfg = ForwardInfConfig(mode="anchored", weight_decay=RECIPE.weight_decay, damping=damping)
        fi = ForwardInf(model, cfg)
        t0 = time.perf_counter()
        s = fi.pairwise((x, y), (xq, yq)).double().numpy()
        k = fi.last_report.steps if fi.last_report else -1
        return lds(s, masks, losses), k, time.perf_counter() - t0

    for mult in args.mults:
        for stop in args.stops:
            curvature._DAMPING_MULT, curvature._STOP = mult, stop
            value, k, sec = anchored(None)
            out[f"x{mult:g}, stop {stop:g}"] = value
            cells.append(f"{value:.3f} ({k}, {sec:.1f}s)")
    curvature._STOP = STOPS[1]
    if "ray-g" in columns:
        mean_eig = _mean_eig(model, x, y)
        for col, rule in (("ray-g", ray_g_damping), ("deff-n/2", deff_damping)):
            delta = rule(model, x, y)
            if delta is None:
                out[col] = float("nan")
                cells.append("n/a")
                continue
            value, _, _ = anchored(delta)
            out[col] = value
            cells.append(f"{value:.3f} ({delta / mean_eig:.2g})")
    print(f"| {name} ({len(y)} train, {len(yq)} queries) | {seed} | {n_params} | "
          + " | ".join(cells) + " |", flush=True)  # fmt: skip
    return out


def _mean_eig(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(H) / P by 64 seeded Hutchinson probes (to express a rule's delta as a multiplier)."""
    params, grad = _flat_grad(model, x, y)
    gen = torch.Generator().manual_seed(0)
    probes = (torch.randn(grad.numel(), generator=gen, dtype=grad.dtype) for _ in range(64))
    return sum(float(z @ _hvp(params, grad, z)) for z in probes) / 64 / grad.numel()


def _summary(cases: list[dict[str, float]], columns: list[str], grid: list[str]) -> None:
    """Mean LDS per column over the cases, and regret against each case's best grid cell."""
    print(f"\nOver {len(cases)} cases: mean LDS, and regret against the case's best multiplier "
          "on the grid (mean, max)\n")  # fmt: skip
    print("| column | mean LDS | mean regret | max regret |\n|---|---:|---:|---:|")
    best = np.array([max(c[g] for g in grid) for c in cases])
    for col in columns:
        vals = np.array([c[col] for c in cases])
        ok = ~np.isnan(vals)
        if not ok.any():
            continue
        regret = best[ok] - vals[ok]
        print(f"| {col} | {vals[ok].mean():.3f} | {regret.mean():.3f} | {regret.max():.3f} |")


if __name__ == "__main__":
    sys.exit(main())
