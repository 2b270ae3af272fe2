"""The generic plain path: stacked per-example updates, then one forward per updated copy.

Works for any ``nn.Module`` (vmap where possible, a loop where not); the fast path of
:mod:`mirrorinf.engine.rank1` is checked against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mirrorinf.engine.examples import Examples, Inputs, move, rows
from mirrorinf.engine.execution import progress
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, plain_scores
from mirrorinf.engine.updates import batchable, per_example_losses, per_example_updates


def generic_pairwise(
    rt: Runtime,
    state: ModelState,
    tr: Examples,
    xq: Inputs,
    yq: torch.Tensor,
    base: torch.Tensor,
) -> Scores:
    """Plain pairwise scores [n_train, n_query] by the generic path."""
    n, m = len(tr), len(yq)
    scores = torch.empty(n, m, dtype=torch.float64)
    drops = torch.empty(m, dtype=torch.float64)
    lrs = torch.empty(m, dtype=torch.float64)
    qb = rt.plan.query_chunk(state.numel)
    q_base = rt.query_losses(state, state.params, xq, yq)
    for qs in progress(range(0, m, qb), m, qb, "pairwise queries"):
        sl = slice(qs, min(qs + qb, m))
        stacked, lr, bufs, _ = per_example_updates(rt, state, rows(xq, sl), yq[sl])
        lrs[sl] = lr.cpu()
        for j in range(sl.stop - sl.start):
            pj = {k: v[j] for k, v in stacked.items()}
            bj = bufs[j] if bufs else None
            q = qs + j
            scores[:, q] = base - rt.losses_over(state, pj, tr, bj)
            drops[q] = (
                q_base[q] - rt.query_losses(state, pj, rows(xq, slice(q, q + 1)), yq[q : q + 1])[0]
            )
    return plain_scores(rt.config, scores, drops, lrs, "generic")


def generic_self(
    rt: Runtime, state: ModelState, xb: Inputs, yb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw loss drops of a chunk of training rows after fitting each alone, and their lrs:
    per-example updates and losses batched over the rows (vmap), a loop only where vmap
    cannot batch the model or BatchNorm statistics move per copy."""
    stacked, lr, bufs, base = per_example_updates(rt, state, xb, yb)
    if base is None:  # bn_update: the update ran in train mode; the loss is eval mode's
        with torch.no_grad(), batchable():  # the kernels of the batched losses below
            base = rt.losses(rt.forward(state, state.params, xb), yb)
    after = per_example_losses(rt, state, stacked, xb, yb, bufs)
    return base - after, lr


SelfChunk = Callable[[ModelState, Inputs, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def agrees_with_generic_self(rt: Runtime, state: ModelState, tr: Examples, fast: SelfChunk) -> bool:
    """Whether a fast self-influence path gives the generic path's scores (per unit lr) on the
    first rows of ``tr``; its exceptions propagate (the caller knows which mean "cannot")."""
    xs, ys = tr.take(slice(0, min(16, len(tr))))
    xs, ys = move(xs, rt.device), ys.to(rt.device)
    got, lr = fast(state, xs, ys)
    ref, ref_lr = generic_self(rt, state, xs, ys)
    got, want = got / lr.clamp_min(1e-300), ref / ref_lr.clamp_min(1e-300)
    tol = 1e-3 * float(want.abs().max()) + 1e-9
    return bool((got - want).abs().max() <= tol)
