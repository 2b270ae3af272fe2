"""Does the influence gate pass on clean labels and fail on noisy ones? Old rule vs calibrated rule.

For each dataset (scikit-learn's bundled digits, breast cancer and wine; no downloads), seed and
label-flip fraction (0, 5%, 10%, 30% of the *training* labels flipped to a random other class by
``_common.flip_labels``; the validation set stays clean), a 1-hidden-layer ReLU MLP (128 units)
is trained with full-batch Adam (lr 1e-2, cosine decay, 400 steps, weight decay 1e-3 on all
parameters: ``_common.MlpRecipe`` / ``_common.objective``) in two regimes:

- ``converged``: all 400 steps. This memorises every flipped label (training error 0).
- ``early``: the same run, keeping the weights of the step with the lowest validation loss
  (early stopping on the validation set, as a user would; the flips are then mostly not fit).

The engine runs with DEFAULT settings (plain mode, automatic step, float32): ``self_influence``
of the training set, ``group`` of the training set on the validation set, and the calibration
scores of the validation set: its ``self_influence`` and a 5-fold held-out group influence (each
fold scored by ``group`` against the other four folds).

Rules compared, all through ``mirrorinf.summary.summarise`` with default ``GateThresholds``:
- old: no calibration scores -> robust-z fallback (self_z > 3.5; group < 0 and group_z < -3.5);
- gi: calibrated conformal thresholds, harmful when ``-group_influence`` exceeds the conformal
  threshold of the calibration rows' ``-group_influence`` (the rule before the loss-after-fit
  one; mislabel_alpha = harmful_alpha = 0.01; a harmful example above the calibration median of
  self-influence is also a suspected mislabel);
- new: the same, but harmful when ``group_influence < 0`` and the loss after the validation fit
  exceeds the conformal threshold of the calibration rows' loss after their fold's fit (the
  summary's rule; ``loss_after_fit`` / ``calib_loss_after_fit``).
- excess: new, plus the gate's ``harmful_excess`` check (rows the validation fit exposes above
  the calibration's 90% quantile, against their limit; ``x exposed/limit`` per flip fraction).
The gate fails when flagged_fraction > max_flagged_fraction (0.05) or harmful_fraction >
max_harmful_fraction (0.05), i.e. the two fraction checks of ``tasks.checks``; with ``excess``
also when harmful_excess fails (all three, as the gate runs them).

Columns: ``mis`` = fraction flagged as suspected mislabel, ``rec`` = fraction of the flipped
labels among them (recall), ``harm`` = fraction flagged harmful; ``gate 0/30`` = gate outcome
(P pass, F fail) at 0% and 30% flips (wanted: P/F).

``--group-fit STEPSxLR`` (e.g. ``50x0.03``) runs the group fit (``mirrorinf.engine.group_fit``)
with another length than its default 50 x 0.01, to measure what that does to the calibration.

``--path-score end --path-target median`` thresholds the harmful flag on a path-free score of
the group fit instead (``mirrorinf.engine.group_fit``, "Path-free rules"); each calibration
fold's fit stops at the training set's target.

``--flips 0 0.3`` / ``--regimes converged`` run only some flip fractions (the gate columns need
0 and 0.3) / regimes.

Run:  python benchmarks/gate_calibration.py [--seeds 3] [--datasets digits cancer wine]
      [--group-fit 50x0.01] [--flips 0 0.05 0.1 0.3]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mirrorinf.engine.group_fit as group_fit
from benchmarks._common import (
    MlpRecipe,
    digits_split,
    flip_labels,
    objective,
    query_losses,
)
from benchmarks.group_path import PathRule, path_rule
from mirrorinf import ForwardInf
from mirrorinf.calibration import calibration_scores
from mirrorinf.summary import GateThresholds, summarise

FLIPS = (0.0, 0.05, 0.1, 0.3)
REGIMES = ("converged", "early")
SIZES = {"digits": (1000, 300), "cancer": (350, 150), "wine": (110, 50)}  # train, validation


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def load(name: str, seed: int) -> Data:
    """Random disjoint train / validation split, features standardised with train statistics."""
    n_train, n_val = SIZES[name]
    if name == "digits":
        s = digits_split(n_train, n_val, seed=seed, dtype=torch.float32)
        return s.x_train, s.y_train, s.x_query, s.y_query, 10
    x, y = (load_breast_cancer if name == "cancer" else load_wine)(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return xs[tr], yt[tr], xs[va], yt[va], int(y.max()) + 1


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    n_classes: int,
    seed: int,
    regime: str,
) -> nn.Module:
    recipe = MlpRecipe()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps)
    best, state = float("inf"), None
    for _ in range(recipe.steps):
        opt.zero_grad()
        objective(model, x, y, recipe.weight_decay).backward()
        opt.step()
        sched.step()
        if regime == "early":
            val = float(query_losses(model, xv, yv).mean())
            if val < best:
                best, state = val, {k: v.clone() for k, v in model.state_dict().items()}
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


RULES = ("old", "gi", "new", "excess")
RULE: PathRule | None = None  # --path-score: the path rule the group fit follows


def run_one(name: str, seed: int, flip: float, regime: str) -> dict[str, tuple]:
    x, y, xv, yv, c = load(name, seed)
    y_noisy, flipped = flip_labels(y, flip, seed=100 + seed, n_classes=c)
    model = train(x, y_noisy, xv, yv, c, seed, regime)
    fi = ForwardInf(model)
    self_inf = fi.self_influence((x, y_noisy)).numpy()
    group = fi.group((x, y_noisy), (xv, yv)).numpy()
    assert fi.last_report is not None and fi.last_report.loss_after_fit is not None
    after = fi.last_report.loss_after_fit.numpy()
    if RULE is not None:  # calibration fits stop at the training set's target
        RULE.fixed_target = RULE.last[0].target
    try:
        calib = calibration_scores(fi, (xv, yv), seed=seed)
    finally:
        if RULE is not None:
            RULE.fixed_target = None
    calib_self, calib_group = calib.self_influence, calib.group_influence
    calibrated = {"calib_self_inf": calib_self, "calib_group_inf": calib_group}
    loss_rule = {"loss_after_fit": after, "calib_loss_after_fit": calib.loss_after_fit}
    common = dict(
        pairwise=np.zeros((len(y), 0)),
        self_inf=self_inf,
        group_inf=group,
        query_self_drop=[],
        thresholds=GateThresholds(),
    )
    out = {}
    for rule, extra in (("old", {}), ("gi", calibrated), ("new", {**calibrated, **loss_rule})):
        t = summarise(**common, **extra)
        mis = t.train["flag_mislabel"].to_numpy()
        rec = float(mis[flipped.numpy()].mean()) if flip else float("nan")
        out[rule] = (t.counts["flagged_fraction"], rec, t.counts["harmful_fraction"])
    c = t.counts  # "excess": the summary's flags and the gate's harmful_excess check
    out["excess"] = (*out["new"], c["exposed_fraction"], c["max_exposed_fraction"])
    return out


def gate_fails(cell: tuple) -> bool:
    th = GateThresholds()
    excess = len(cell) > 3 and cell[3] > cell[4]  # harmful_excess: exposed > its limit
    return cell[0] > th.max_flagged_fraction or cell[2] > th.max_harmful_fraction or excess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--group-fit", help="the group fit's STEPSxLR, e.g. 50x0.03 (default 50x0.01)")
    ap.add_argument(
        "--path-score",
        choices=("constant", "end", "mean", "logmean"),
        help="the harmful flag's score from the fit run until the validation set is fitted",
    )
    ap.add_argument("--path-target", choices=("half", "median"), default="half")
    ap.add_argument("--flips", nargs="+", type=float, default=list(FLIPS))
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    args = ap.parse_args()
    flips = tuple(sorted(set(args.flips)))
    if args.group_fit:
        steps, lr = args.group_fit.split("x")
        group_fit._GROUP_FIT_STEPS, group_fit._GROUP_FIT_LR = int(steps), float(lr)
    global RULE
    stack = contextlib.ExitStack()
    if args.path_score and args.path_score != "constant":
        RULE = stack.enter_context(path_rule(args.path_score, args.path_target))
    logging.disable(logging.WARNING)  # the fallback warning fires on every "old" row
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    head = (
        f"{'dataset':7s} {'regime':9s} {'s':>1s} {'rule':4s} | {'0%: mis  harm':>13s} | "
        + " | ".join(f"{int(f * 100):>2d}%: mis  rec  harm" for f in flips[1:])
        + " | gate 0/30"
    )
    print(head)
    print("-" * len(head))
    tally: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    clean: dict[str, list[tuple]] = {}
    for name in args.datasets:
        for regime in args.regimes:
            for seed in range(args.seeds):
                res = {f: run_one(name, seed, f, regime) for f in flips}
                for rule in RULES:
                    cells = [res[f][rule] for f in flips]
                    g0, g30 = gate_fails(cells[0]), gate_fails(cells[-1])
                    tally.setdefault((regime, rule), []).append((g0, g30))
                    clean.setdefault(rule, []).append(cells[0])
                    row = (
                        f"{name:7s} {regime:9s} {seed:1d} {rule:4s} | "
                        f"{cells[0][0]:7.3f} {cells[0][2]:5.3f} | "
                        + " | ".join(f"{c[0]:7.3f} {c[1]:4.2f} {c[2]:5.3f}" for c in cells[1:])
                        + f" | {'F' if g0 else 'P'}/{'F' if g30 else 'P'}"
                        + "".join(f" x{c[3]:.3f}/{c[4]:.3f}" for c in cells if len(c) > 3)
                    )
                    print(row, flush=True)
    print()
    for rule in RULES:
        h0 = np.array([c[2] for c in clean[rule]])
        m0 = np.array([c[0] for c in clean[rule]])
        print(
            f"clean runs, {rule}: harmful max {h0.max():.3f}, > 5% in {int((h0 > 0.05).sum())}/"
            f"{len(h0)}; mislabel max {m0.max():.3f}, > 5% in {int((m0 > 0.05).sum())}/{len(m0)}"
        )
    for (regime, rule), v in sorted(tally.items()):
        v = np.array(v)
        print(
            f"{regime:9s} {rule}: gate passes at 0% in {int((~v[:, 0]).sum())}/{len(v)} runs, "
            f"fails at 30% in {int(v[:, 1].sum())}/{len(v)}; wanted P/F in "
            f"{int(((~v[:, 0]) & v[:, 1]).sum())}/{len(v)}"
        )
    print(f"({time.perf_counter() - t0:.0f} s)")
    stack.close()


if __name__ == "__main__":
    main()
