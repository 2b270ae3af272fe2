"""Parameter updates and their gradients: per-example (stacked), mean over a set, per copy.

Every function takes the call's ``ModelState`` explicitly; stacked parameter sets carry a
leading copy dimension [k, ...].
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from mirrorinf.engine.examples import Examples, Inputs, each, move, rows
from mirrorinf.engine.execution import Params
from mirrorinf.engine.runtime import AUTOCAST_MIN_STEP, ModelState, Runtime

log = logging.getLogger(__name__)

AdamState = dict[tuple[str, str], torch.Tensor]
_LOOP_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models told about the loop


@contextmanager
def batchable() -> Iterator[None]:
    """Kernels vmap can batch: SDPA's math backend (CPU flash attention and its backward have
    no batching rule, so vmap would loop over examples) and no fused transformer fast path."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


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
    """Norm of each copy of a stacked parameter set, as float64: each tensor's norm in its own
    dtype (no float64 copy of m parameter sets: that copy cost more than the gradients), the
    sum of their squares in float64."""
    sq = [torch.linalg.vector_norm(v.flatten(1), dim=1).double().pow(2) for v in d.values()]
    return torch.sqrt(torch.stack(sq).sum(dim=0))


def per_example_updates(
    rt: Runtime, state: ModelState, x: Inputs, y: torch.Tensor
) -> tuple[Params, torch.Tensor, list[Params] | None, torch.Tensor | None]:
    """Stacked parameters [m, ...] after ``steps`` updates, each on its own example; the lr of
    each, each copy's BatchNorm buffers when bn_update lets them move, and each example's loss
    at theta (taken with the first gradient; None with bn_update, whose update runs BatchNorm
    in train mode). The first step's gradients are taken at the shared parameters (no m copies
    of theta to build or read)."""
    m = len(y)
    shared = {k: v.unsqueeze(0) for k, v in state.params.items()}
    stacked: Params | None = None  # None: every copy still equals theta
    bufs = None
    if rt.config.bn_update:
        bufs = [{k: v.clone() for k, v in state.buffers.items()} for _ in range(m)]
    adam: AdamState = {}
    lr = base = None
    for t in range(rt.steps):
        if stacked is None:
            g, base = per_example_grads_and_losses(rt, state, state.params, x, y, bufs, True)
        else:
            g = per_example_grads(rt, state, stacked, x, y, bufs)
        d = direction(g, adam, t, rt.config.optimizer)
        if lr is None:
            lr = step_lr(rt, state, stack_norm(d))
        coef = (-rt.sign * lr).to(rt.dtype)
        prev = shared if stacked is None else stacked
        stacked = {
            k: torch.addcmul(prev[k], coef.reshape(-1, *[1] * (prev[k].ndim - 1)), d[k])
            for k in prev
        }
    assert lr is not None and stacked is not None
    return stacked, lr, bufs, None if bufs else base


def _row_loss(rt: Runtime, state: ModelState) -> Callable[[Params, Inputs, Tensor], Tensor]:
    """The loss of one example under parameters ``p`` (a scalar), the function vmap batches."""

    def f(p: Params, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
        one = each(xi, lambda v: v.unsqueeze(0))
        return rt.losses(rt.forward(state, p, one), yi.unsqueeze(0))[0]

    return f


def per_example_grads(
    rt: Runtime,
    state: ModelState,
    stacked: Params,
    x: Inputs,
    y: torch.Tensor,
    bufs: list[Params] | None,
    shared: bool = False,
) -> Params:
    """Gradient of each example's loss under its own copy of the parameters (``shared``: one
    unstacked set for every example)."""
    return per_example_grads_and_losses(rt, state, stacked, x, y, bufs, shared)[0]


def per_example_grads_and_losses(
    rt: Runtime,
    state: ModelState,
    stacked: Params,
    x: Inputs,
    y: torch.Tensor,
    bufs: list[Params] | None,
    shared: bool = False,
) -> tuple[Params, torch.Tensor]:
    """Per-example gradients (as :func:`per_example_grads`) and the losses they were taken
    at [m], from the same forward pass (``torch.func.grad_and_value``)."""
    x, y = move(x, rt.device), y.to(rt.device)
    if bufs is None and state.vmap_ok:
        try:
            dims = (None if shared else 0, 0, 0)
            f = grad_and_value(_row_loss(rt, state))
            with batchable():
                out: tuple[Params, Tensor] = vmap(f, in_dims=dims, randomness="same")(stacked, x, y)
            return out
        except Exception as exc:  # model uses an op vmap cannot batch: loop instead
            vmap_failed(rt, state, "per-example gradients", exc)
    res = {
        k: torch.empty(len(y), *v.shape[0 if shared else 1 :], dtype=v.dtype, device=v.device)
        for k, v in stacked.items()
    }
    losses = torch.empty(len(y), dtype=torch.float64, device=rt.device)
    for j in range(len(y)):
        p = {k: (v if shared else v[j]).detach().requires_grad_(True) for k, v in stacked.items()}
        with rt.bn_train(bufs is not None):
            out_j = rt.forward(state, p, rows(x, slice(j, j + 1)), bufs[j] if bufs else None)
            loss = rt.losses(out_j, y[j : j + 1]).sum()
        gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        losses[j] = loss.detach()
        for k, gk in zip(p, gs, strict=True):
            res[k][j] = 0 if gk is None else gk
    return res, losses


def per_example_losses(
    rt: Runtime,
    state: ModelState,
    stacked: Params,
    x: Inputs,
    y: torch.Tensor,
    bufs: list[Params] | None,
) -> torch.Tensor:
    """Loss of each example under its own copy of the parameters [m] (one batched forward)."""
    with torch.no_grad():
        if bufs is None and state.vmap_ok:
            try:
                with batchable():
                    out: torch.Tensor = vmap(_row_loss(rt, state), randomness="same")(stacked, x, y)
                return out
            except Exception as exc:  # model uses an op vmap cannot batch: loop instead
                vmap_failed(rt, state, "per-example losses", exc)
        parts = []
        for j in range(len(y)):
            pj = {k: v[j] for k, v in stacked.items()}
            out_j = rt.forward(state, pj, rows(x, slice(j, j + 1)), bufs[j] if bufs else None)
            parts.append(rt.losses(out_j, y[j : j + 1]))
        return torch.cat(parts)


def vmap_failed(rt: Runtime, state: ModelState, what: str, exc: Exception) -> None:
    """Fall back to a per-example loop for this call, saying so once per model (much slower)."""
    state.vmap_ok = False
    if rt.model not in _LOOP_WARNED:
        _LOOP_WARNED.add(rt.model)
        log.warning(
            "vmap cannot batch this model's %s (%s: %s); looping over examples (much slower)",
            what,
            type(exc).__name__,
            str(exc).split("\n")[0][:200],
        )


def mean_grad(
    rt: Runtime,
    state: ModelState,
    p: Params,
    data: Examples,
    rows: list[torch.Tensor] | None = None,
) -> Params:
    """Gradient of the mean loss over ``data`` (streamed; exact, not a subsample); with
    ``rows``, each batch's per-example losses (detached) are appended to it."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
    acc = {k: torch.zeros_like(v) for k, v in p.items()}
    for _, xb, yb in data.batches(rt.plan.train_batch, rt.device):
        each_loss = rt.losses(rt.forward(state, leaves, xb), yb)
        if rows is not None:
            rows.append(each_loss.detach())
        loss = each_loss.sum() / len(data)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for k, gk in zip(leaves, gs, strict=True):
            if gk is not None:
                acc[k] += gk
    return acc


def stacked_losses(rt: Runtime, state: ModelState, stacked: Params, data: Examples) -> torch.Tensor:
    """Per-example losses [k, n] of ``data`` under each of k stacked parameter sets."""
    k = next(iter(stacked.values())).shape[0]
    out = torch.empty(k, len(data), dtype=torch.float64)
    for sl, losses in stacked_loss_blocks(rt, state, stacked, data):
        out[:, sl] = losses
    return out


def stacked_loss_blocks(
    rt: Runtime, state: ModelState, stacked: Params, data: Examples
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, losses [k, rows] on the CPU) of ``data`` under each of k stacked parameter sets,
    one forward batch at a time."""
    k = next(iter(stacked.values())).shape[0]
    with torch.no_grad():
        for start, xb, yb in data.batches(rt.plan.rows_per_copy(k), rt.device):
            sl = slice(start, start + len(yb))
            if state.vmap_ok:
                try:
                    yield (
                        sl,
                        vmap(
                            lambda p, xb=xb, yb=yb: rt.losses(rt.forward(state, p, xb), yb),
                            randomness="same",
                        )(stacked).cpu(),
                    )
                    continue
                except Exception as exc:
                    vmap_failed(rt, state, "losses over parameter sets", exc)
            losses = torch.empty(k, len(yb), dtype=torch.float64)
            for j in range(k):
                pj = {n: v[j] for n, v in stacked.items()}
                losses[j] = rt.losses(rt.forward(state, pj, xb), yb).cpu()
            yield sl, losses
