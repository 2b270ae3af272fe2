"""Anchored mode: steps on the training objective + eps * loss(q), against a control run.

Objective: mean training loss - g0 . theta + (wd/2)||theta - theta0||^2 + weight * loss(q).
theta0 is its stationary point without the query (g0 = the training gradient at theta0), so a
not-quite-converged model does not keep training during the run (which drifts and, at lr ~
1/lambda_max, sharpens into chaos); the control run is theta itself. Step size and run length
come from the Hessian's extreme eigenvalues; stability = agreement of the half-length run.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import numpy as np
import torch

from mirrorinf.engine.curvature import curvature_rows, hessian_extremes
from mirrorinf.engine.examples import Examples, Inputs, each, move, rows
from mirrorinf.engine.execution import Params, data_key, progress
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, rescale
from mirrorinf.engine.updates import mean_grad, per_example_grads, stacked_losses, stacked_mean_grad
from mirrorinf.metrics import spearman

log = logging.getLogger(__name__)

# Anchored runs on an indefinite Hessian follow gradient flow: lr = _FIT_LR / lambda_max, a tenth
# of the stability limit (positive definite: 1 / lambda_max, where the Neumann series is exact).
# Measured on a digits MLP (lambda_max 0.16), larger steps at the same lr*steps were far less
# faithful (LDS 0.49 at lr 3 vs 0.67 at lr 0.5 for lr*steps = 100): discretisation matters.
_FIT_LR = 0.1
_ANCHOR_STEPS = 300


class AnchoredScorer:
    """Anchored mode for pairwise and group influence; self-influence is the plain twin's
    (anchored self-influence would need n_train anchored runs)."""

    mode: ClassVar[str] = "anchored"
    # its differences are weighted by anchor_eps ~ 1/n: float32 rounding would zero many
    auto_dtype: ClassVar[torch.dtype] = torch.float64
    self_in_plain_twin: ClassVar[bool] = True

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def pairwise(self, state: ModelState, tr: Examples, xq: Inputs, yq: torch.Tensor) -> Scores:
        return anchored_scores(self.rt, state, tr, xq, yq)

    def group(self, state: ModelState, tr: Examples, xq: Inputs, yq: torch.Tensor) -> Scores:
        return anchored_scores(self.rt, state, tr, xq, yq, group=True)

    def self_influence(self, state: ModelState, tr: Examples) -> Scores:
        raise NotImplementedError("anchored self-influence is computed by the plain twin")


def anchored_scores(
    rt: Runtime,
    state: ModelState,
    tr: Examples,
    xq: Inputs,
    yq: torch.Tensor,
    group: bool = False,
) -> Scores:
    """Pairwise scores [n_train, n_query] (or [n_train, 1] for the whole set with ``group``)."""
    cfg = rt.config
    lam_max, lam_min = curvature(rt, state, tr)
    lr = cfg.lr if cfg.lr is not None else (1.0 if lam_min > 0 else _FIT_LR) / lam_max
    steps = cfg.steps or anchored_steps(lr, lam_min)
    eps = cfg.anchor_eps if cfg.anchor_eps is not None else 1.0 / len(tr)
    mid = max(1, steps // 2)
    g0 = rt.cache.train_grad.get(
        (state.key, data_key(tr)), lambda: mean_grad(rt, state, state.params, tr)
    )
    base = rt.base_losses(state, tr)
    n_cols = 1 if group else len(yq)
    scores = torch.empty(len(tr), n_cols, dtype=torch.float64)
    scores_mid = torch.empty_like(scores)
    drops = torch.empty(n_cols, dtype=torch.float64)
    query_weight = eps * (len(yq) if group else 1)
    weight = query_weight * rt.sign
    k = n_cols if group else rt.plan.query_chunk(state.numel)
    q_ctrl = rt.query_losses(state, state.params, xq, yq)
    for qs in progress(range(0, n_cols, k), n_cols, k, "anchored queries"):
        sl = slice(qs, min(qs + k, n_cols))
        xs, ys = (xq, yq) if group else (rows(xq, sl), yq[sl])
        p_mid, p_end = _runs(rt, state, tr, xs, ys, weight, lr, steps, mid, g0, group)
        scores[:, sl] = (base.unsqueeze(0) - stacked_losses(rt, state, p_end, tr)).T
        scores_mid[:, sl] = (base.unsqueeze(0) - stacked_losses(rt, state, p_mid, tr)).T
        q = Examples("q", x=each(xs, lambda v: v.cpu()), y=ys.cpu(), n=len(ys))
        q_end = stacked_losses(rt, state, p_end, q)
        if group:
            drops[0] = (q_ctrl - q_end[0]).mean()
        else:
            drops[sl] = q_ctrl[sl] - q_end.diagonal()
    # scores per unit of query weight, so they do not shrink with n_train (sign: proponent > 0)
    divisor = torch.tensor([query_weight], dtype=torch.float64)
    matrix, drop = rescale(cfg, scores, drops, divisor)
    matrix_mid, _ = rescale(cfg, scores_mid, None, divisor)
    stability = _rank_agreement(matrix_mid, matrix)
    if stability is not None and stability < 0.8:
        log.warning(
            "anchored scores at %d and %d steps agree only to Spearman %.2f; "
            "consider fewer steps or a smaller lr",
            mid,
            steps,
            stability,
        )
    log.info(
        "anchored mode: lr %.3g (1/lambda_max=%.3g), %d steps, eps %.3g, stability %s",
        lr,
        1.0 / lam_max,
        steps,
        eps,
        stability,
    )
    lrs = torch.tensor([lr])  # default dtype, as the report always had it
    return Scores(
        matrix, drop, "per_unit_query_weight", "anchored", lrs, steps, lam_max, lam_min, stability
    )


def _runs(
    rt: Runtime,
    state: ModelState,
    tr: Examples,
    xq: Inputs,
    yq: torch.Tensor,
    weight: float,
    lr: float,
    steps: int,
    mid: int,
    g0: Params,
    group: bool,
) -> tuple[Params, Params]:
    """Stacked parameters at ``mid`` and ``steps`` steps of the anchored objective: one copy per
    query (or one for the whole set with ``group``), all stepped together on the full-batch
    training gradient."""
    k = 1 if group else len(yq)
    p = {n: v.unsqueeze(0).expand(k, *v.shape).clone() for n, v in state.params.items()}
    wd = rt.config.weight_decay
    q = Examples("q", x=xq, y=yq, n=len(yq))
    snap = p
    for t in range(steps):
        g = stacked_mean_grad(rt, state, p, tr)
        if group:
            gq = mean_grad(rt, state, {n: v[0] for n, v in p.items()}, q)
            g = {n: g[n] + weight * gq[n].unsqueeze(0) for n in g}
        else:
            gq = per_example_grads(rt, state, p, xq, yq, None)
            g = {n: g[n] + weight * gq[n] for n in g}
        p = {n: v - lr * (g[n] - g0[n] + wd * (v - state.params[n])) for n, v in p.items()}
        if t + 1 == mid:
            snap = p
    return snap, p


def curvature(rt: Runtime, state: ModelState, tr: Examples) -> tuple[float, float]:
    """Extreme Hessian eigenvalues of the mean loss over ``tr`` + weight decay (cached)."""
    wd, seed = rt.config.weight_decay, rt.config.seed

    def compute() -> tuple[float, float]:
        xs, ys = tr.take(curvature_rows(tr, seed))
        xs, ys = move(xs, rt.device), ys.to(rt.device)

        def objective(p: Params) -> torch.Tensor:
            return rt.losses(rt.forward(state, p, xs), ys).mean()

        lam_max, lam_min = hessian_extremes(objective, state.params, seed=seed)
        # a tensor of the default dtype (float32), as the cache always stored them
        lam = torch.tensor([lam_max + wd, lam_min + wd])
        return float(lam[0]), float(lam[1])

    lam_max, lam_min = rt.cache.curvature.get((state.key, data_key(tr), wd), compute)
    if not lam_max > 0:
        raise ValueError("the training objective has no positive curvature here; set lr explicitly")
    return lam_max, lam_min


def anchored_steps(lr: float, lam_min: float) -> int:
    """Run length from the curvature (lambda_min from Lanczos).

    Positive definite (e.g. L2-regularised convex models): run until the slowest direction has
    converged to within e^-3, ceil(3 / (lr * lambda_min)) steps, 20..500. Indefinite (a trained
    network): _ANCHOR_STEPS small steps, fewer if negative curvature would grow more than 2x,
    (1 + lr |lambda_min|)^K <= 2. On a digits MLP at lr 0.1/lambda_max, LDS rose with the run
    length: 0.58 / 0.66 / 0.70 at 100 / 160 / 300 steps (TracIn 0.45).
    """
    if lam_min > 0:
        return int(min(500, max(20, math.ceil(3.0 / (lr * lam_min)))))
    if lam_min == 0:
        return _ANCHOR_STEPS
    k = math.floor(math.log(2.0) / math.log1p(lr * abs(lam_min)))
    return int(min(_ANCHOR_STEPS, max(20, k)))


def _rank_agreement(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean per-column Spearman of two score matrices; None when no column can be ranked
    (a single training row, or every column constant)."""
    if a.shape[0] < 2:
        return None
    rho = spearman(a.numpy(), b.numpy())
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else None
