"""Path-free rules for the group fit (issue 16), a benchmark experiment, not the default.

The engine's group fit (``mirrorinf.engine.group_fit``) runs 50 Adam steps of lr 0.01 * rms(theta)
on the validation set. These rules run the same fit until the validation set is *fitted* (every
validation row's loss <= ln 2, ``half``, or <= the trained model's median training loss,
``median``) and score each training row by its loss there (``end``) or its mean along the path
(``mean`` over steps, ``logmean`` over log-steps). The measured tables are in group_fit.py's
docstring; ``benchmarks/cleanlab.py --rule-names fitted fitted-median`` and
``benchmarks/gate_calibration.py --path-score ... --path-target ...`` run them through
:func:`path_rule`, which swaps the scorer's group fit for the duration of a ``with`` block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import mirrorinf.engine.scorer as scorer
from mirrorinf.engine import group_fit as gf
from mirrorinf.engine.examples import Examples, Inputs
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, rescale
from mirrorinf.engine.updates import direction, mean_grad

CAP = 5000  # never reached on the benchmark's sets (at most 780 steps in 30 seeds)
SCORES = ("end", "mean", "logmean")
TARGETS = ("half", "median")


@dataclass
class PathFit:
    """The group fit run until every query row is fitted: each training row's loss at geometric
    checkpoints ``ts`` (1, 2, 4, ..., and the last step), at the default's step count, and the
    scores along the path; ``steps`` the fitted step (``CAP`` when never fitted)."""

    base: torch.Tensor
    ts: list[int]
    at: list[torch.Tensor]
    at_default: torch.Tensor
    steps: int
    forwards: int  # forward passes over the training set
    target: float = 0.0  # the loss every query row was fitted below
    cap: int | None = None  # a capped rule's last step (``capped``)
    at_cap: torch.Tensor | None = None  # training losses at ``cap`` if not fitted by then

    def end(self) -> torch.Tensor:
        """Each training row's loss where the query set is fitted."""
        return self.at[-1] if self.ts and self.ts[-1] == self.steps else self.base

    def capped(self) -> torch.Tensor:
        """Each training row's loss where the query set is fitted or at ``cap``, whichever
        comes first (the same fit stopped early: a cheaper end)."""
        return self.end() if self.at_cap is None else self.at_cap

    def mean(self) -> torch.Tensor:
        """Mean loss over steps 0..T (trapezoid over the checkpoints)."""
        if self.steps == 0:
            return self.base
        t = torch.tensor([0.0, *map(float, self.ts)], dtype=torch.float64)
        y = torch.stack([self.base, *self.at]).double()
        return torch.trapezoid(y, t, dim=0) / t[-1]

    def logmean(self) -> torch.Tensor:
        """Mean loss over log-steps 1..T (each doubling of the fit weighs the same)."""
        if self.steps <= 1:
            return self.end()
        t = torch.log(torch.tensor(list(map(float, self.ts)), dtype=torch.float64))
        return torch.trapezoid(torch.stack(self.at).double(), t, dim=0) / t[-1]


@dataclass
class PathRule:
    """Which path score and target a patched group fit uses, and what it last saw."""

    score: str = "end"
    target: str = "half"
    fixed_target: float | None = None  # calibration folds: the training set's target
    lr: float | None = None  # Adam's lr in units of rms(theta); None: the engine's default's
    cap: int | None = None  # also record the training losses at this step (``PathFit.capped``)
    last: list[PathFit] = field(default_factory=list)


def path_fit(
    rt: Runtime,
    state: ModelState,
    tr: Examples,
    xq: Inputs,
    yq: torch.Tensor,
    lr: float,
    rule: PathRule,
) -> PathFit:
    """Adam at ``lr`` on the query set's mean loss until every query row is fitted (or CAP
    steps), recording the training rows' losses at geometric checkpoints."""
    base = rt.base_losses(state, tr)
    target = math.log(2.0) if rule.target == "half" else float(base.median())
    if rule.fixed_target is not None:
        target = rule.fixed_target
    p = {k: v.clone() for k, v in state.params.items()}
    adam: dict[tuple[str, str], torch.Tensor] = {}
    q = Examples("queries", x=xq, y=yq, n=len(yq))
    ts: list[int] = []
    at: list[torch.Tensor] = []
    at_default, at_cap, steps, t = base, None, -1, 0
    n_default = gf._GROUP_FIT_STEPS
    while True:
        rows: list[torch.Tensor] = []
        g = mean_grad(rt, state, p, q, rows)
        if steps < 0:
            fitted = bool((torch.cat(rows) <= target).all())
            if t > 0 and (t & (t - 1) == 0 or fitted or t == CAP):
                ts.append(t)
                at.append(rt.losses_over(state, p, tr))
            if fitted or t == CAP:
                steps = t
            elif t == rule.cap:
                at_cap = at[-1] if ts and ts[-1] == t else rt.losses_over(state, p, tr)
        if t == n_default:
            at_default = at[-1] if ts and ts[-1] == t else rt.losses_over(state, p, tr)
        if steps >= 0 and t >= n_default:
            break
        d = direction(g, adam, t, "adam")
        p = {k: v - rt.sign * lr * d[k] for k, v in p.items()}
        t += 1
    forwards = len(ts) + int(not ts or n_default not in ts)
    forwards += int(at_cap is not None and rule.cap not in ts)
    return PathFit(base, ts, at, at_default, steps, forwards, target, rule.cap, at_cap)


def _path_group_fit(
    rule: PathRule, rt: Runtime, state: ModelState, tr: Examples, xq: Inputs, yq: torch.Tensor
) -> Scores:
    """The group column (loss change at the default's steps, at the rule's lr) with the harmful
    flag's score taken from the path to the fitted query set (the query set's own drop reads 0)."""
    rms = state.norm / math.sqrt(max(1, state.numel))
    lr = (gf._GROUP_FIT_LR if rule.lr is None else rule.lr) * max(rms, 1e-3)
    path = path_fit(rt, state, tr, xq, yq, lr, rule)
    rule.last[:] = [path]
    col = (path.base - path.at_default).unsqueeze(1)
    col, _ = rescale(rt.config, col, torch.zeros(1, dtype=col.dtype), None)
    out = Scores(col, torch.zeros(1), "loss", "generic", torch.tensor([lr]), gf._GROUP_FIT_STEPS)
    out.loss_after = getattr(path, rule.score)().detach().double().cpu()
    return out


@contextmanager
def path_rule(
    score: str, target: str, lr: float | None = None, cap: int | None = None
) -> Iterator[PathRule]:
    """Within the block, the engine's default group fit follows the path rule (score, target;
    Adam's lr ``lr`` x rms(theta), default the engine's; training losses also kept at step
    ``cap``); configured group updates (steps or lr given) are unchanged."""
    if score not in SCORES or target not in TARGETS:
        raise ValueError(f"path rule: score in {SCORES}, target in {TARGETS}")
    rule = PathRule(score, target, lr=lr, cap=cap)
    original = scorer.group_fit

    def patched(rt: Runtime, state: ModelState, tr: Examples, xq: Inputs, yq: torch.Tensor):
        if rt.config.steps is None and rt.config.lr is None:
            return _path_group_fit(rule, rt, state, tr, xq, yq)
        return original(rt, state, tr, xq, yq)

    scorer.group_fit = patched  # type: ignore[assignment]
    try:
        yield rule
    finally:
        scorer.group_fit = original  # type: ignore[assignment]
