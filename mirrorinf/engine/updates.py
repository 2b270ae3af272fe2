"""Parameter updates and their gradients: per-example (stacked), mean over a set, per copy.

Every function takes the call's ``ModelState`` explicitly; stacked parameter sets carry a
leading copy dimension [k, ...].
"""

from __future__ import annotations

import logging

import torch
from torch.func import grad, vmap

from mirrorinf.engine.examples import Examples, Inputs, each, move, rows
from mirrorinf.engine.execution import Params
from mirrorinf.engine.runtime import AUTOCAST_MIN_STEP, ModelState, Runtime

log = logging.getLogger(__name__)

AdamState = dict[tuple[str, str], torch.Tensor]


def direction(g: Params, state: AdamState, t: int, optimizer: str) -> Params:
    """Update direction of ``optimizer`` (Adam keeps its moments in ``state``)."""
    if optimizer == "sgd":
        return g
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = {}
    for k, v in g.items():
        m = state.setdefault(("m", k), torch.zeros_like(v)).mul_(b1).add_(v, alpha=1 - b1)
        s = state.setdefault(("v", k), torch.zeros_like(v)).mul_(b2).addcmul_(v, v, value=1 - b2)
        out[k] = (m / (1 - b1 ** (t + 1))) / ((s / (1 - b2 ** (t + 1))).sqrt() + eps)
    return out


def step_lr(rt: Runtime, state: ModelState, dnorm: torch.Tensor) -> torch.Tensor:
    """Per-example lr: the configured one, or a normalised step of rel_step * ||theta||."""
    if rt.config.lr is not None:
        return torch.full_like(dnorm, rt.config.lr)
    rel = max(rt.config.rel_step, AUTOCAST_MIN_STEP.get(rt.config.autocast, 0.0))
    length = rel * max(state.norm, 1e-3)
    lr = torch.where(dnorm > 0, length / dnorm.double().clamp_min(1e-300), 0.0)
    # a gradient so small that its lr would overflow the update's dtype: no step here; the
    # all-zero column is then recomputed in float64 (see the facade's upcast)
    return torch.where(lr < torch.finfo(rt.dtype).max * 1e-6, lr, 0.0).to(dnorm.dtype)


def stack_norm(d: Params) -> torch.Tensor:
    """Norm of each copy of a stacked parameter set, in float64."""
    return torch.sqrt(sum(v.double().flatten(1).pow(2).sum(dim=1) for v in d.values()))  # type: ignore[arg-type]


def per_example_updates(
    rt: Runtime, state: ModelState, x: Inputs, y: torch.Tensor
) -> tuple[Params, torch.Tensor, list[Params] | None]:
    """Stacked parameters [m, ...] after ``steps`` updates, each on its own example; the lr of
    each, and each copy's BatchNorm buffers when bn_update lets them move."""
    m = len(y)
    stacked = {k: v.unsqueeze(0).expand(m, *v.shape).clone() for k, v in state.params.items()}
    bufs = None
    if rt.config.bn_update:
        bufs = [{k: v.clone() for k, v in state.buffers.items()} for _ in range(m)]
    adam: AdamState = {}
    lr = None
    for t in range(rt.steps):
        g = per_example_grads(rt, state, stacked, x, y, bufs)
        d = direction(g, adam, t, rt.config.optimizer)
        if lr is None:
            lr = step_lr(rt, state, stack_norm(d))
        coef = (-rt.sign * lr).to(rt.dtype)
        for k in stacked:
            stacked[k] = stacked[k] + coef.reshape(-1, *[1] * (stacked[k].ndim - 1)) * d[k]
    assert lr is not None
    return stacked, lr, bufs


def per_example_grads(
    rt: Runtime,
    state: ModelState,
    stacked: Params,
    x: Inputs,
    y: torch.Tensor,
    bufs: list[Params] | None,
) -> Params:
    """Gradient of each example's loss under its own copy of the parameters."""
    x, y = move(x, rt.device), y.to(rt.device)
    if bufs is None and state.vmap_ok:

        def f(p: Params, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
            xi = each(xi, lambda v: v.unsqueeze(0))
            return rt.losses(rt.forward(state, p, xi), yi.unsqueeze(0)).sum()

        try:
            out: Params = vmap(grad(f), in_dims=(0, 0, 0), randomness="same")(stacked, x, y)
            return out
        except Exception as exc:  # model uses an op vmap cannot batch: loop instead
            log.debug("vmap over examples failed (%s); looping", exc)
            state.vmap_ok = False
    res = {k: torch.empty_like(v) for k, v in stacked.items()}
    for j in range(len(y)):
        p = {k: v[j].detach().requires_grad_(True) for k, v in stacked.items()}
        with rt.bn_train(bufs is not None):
            out_j = rt.forward(state, p, rows(x, slice(j, j + 1)), bufs[j] if bufs else None)
            loss = rt.losses(out_j, y[j : j + 1]).sum()
        gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        for k, gk in zip(p, gs, strict=True):
            res[k][j] = 0 if gk is None else gk
    return res


def mean_grad(rt: Runtime, state: ModelState, p: Params, data: Examples) -> Params:
    """Gradient of the mean loss over ``data`` (streamed; exact, not a subsample)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
    acc = {k: torch.zeros_like(v) for k, v in p.items()}
    for _, xb, yb in data.batches(rt.plan.train_batch, rt.device):
        loss = rt.losses(rt.forward(state, leaves, xb), yb).sum() / len(data)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for k, gk in zip(leaves, gs, strict=True):
            if gk is not None:
                acc[k] += gk
    return acc


def stacked_mean_grad(rt: Runtime, state: ModelState, stacked: Params, data: Examples) -> Params:
    """Gradient of the mean loss over ``data`` for each of k stacked parameter sets."""
    k = next(iter(stacked.values())).shape[0]
    if k == 1:
        g = mean_grad(rt, state, {n: v[0] for n, v in stacked.items()}, data)
        return {n: v.unsqueeze(0) for n, v in g.items()}

    def f(p: Params, xb: Inputs, yb: torch.Tensor) -> torch.Tensor:
        return rt.losses(rt.forward(state, p, xb), yb).sum()

    acc = {n: torch.zeros_like(v) for n, v in stacked.items()}
    for _, xb, yb in data.batches(rt.plan.rows_per_copy(k), rt.device):
        if state.vmap_ok:
            try:
                gs = vmap(grad(f), in_dims=(0, None, None), randomness="same")(stacked, xb, yb)
                for n in acc:
                    acc[n] += gs[n]
                continue
            except Exception as exc:  # an op vmap cannot batch: loop over the copies
                log.debug("vmap over parameter sets failed (%s); looping", exc)
                state.vmap_ok = False
        sub = Examples("batch", x=xb, y=yb, n=len(yb))
        for j in range(k):
            gj = mean_grad(rt, state, {n: v[j] for n, v in stacked.items()}, sub)
            for n in acc:
                acc[n][j] += gj[n] * len(yb)
    return {n: v / len(data) for n, v in acc.items()}


def stacked_losses(rt: Runtime, state: ModelState, stacked: Params, data: Examples) -> torch.Tensor:
    """Per-example losses [k, n] of ``data`` under each of k stacked parameter sets."""
    k = next(iter(stacked.values())).shape[0]
    out = torch.empty(k, len(data), dtype=torch.float64)
    with torch.no_grad():
        for start, xb, yb in data.batches(rt.plan.rows_per_copy(k), rt.device):
            sl = slice(start, start + len(yb))
            if state.vmap_ok:
                try:
                    out[:, sl] = vmap(
                        lambda p, xb=xb, yb=yb: rt.losses(rt.forward(state, p, xb), yb),
                        randomness="same",
                    )(stacked).cpu()
                    continue
                except Exception as exc:
                    log.debug("vmap over parameter sets failed (%s); looping", exc)
                    state.vmap_ok = False
            for j in range(k):
                pj = {n: v[j] for n, v in stacked.items()}
                out[j, sl] = rt.losses(rt.forward(state, pj, xb), yb).cpu()
    return out
