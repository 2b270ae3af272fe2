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
from mirrorinf.engine.scores import Scores, ScoreSink, ScoreWriter
from mirrorinf.engine.updates import batchable, per_example_losses, per_example_updates


def generic_pairwise(
    rt: Runtime,
    state: ModelState,
    tr: Examples,
    xq: Inputs,
    yq: torch.Tensor,
    base: torch.Tensor,
    out: ScoreSink,
) -> Scores:
    """Plain pairwise scores [n_train, n_query] by the generic path, written into ``out`` one
    block of training rows x a query chunk at a time (each row's loss under each updated copy
    comes from the same forward batches as a whole-column pass)."""
    m = len(yq)
    writer = ScoreWriter.plain(rt.config, out)
    drops = torch.empty(m, dtype=torch.float64)
    lrs = torch.empty(m, dtype=torch.float64)
    qb = rt.plan.query_chunk(state.numel)
    q_base = rt.query_losses(state, state.params, xq, yq)
    for qs in progress(range(0, m, qb), m, qb, "pairwise queries"):
        sl = slice(qs, min(qs + qb, m))
        stacked, lr, bufs, _ = per_example_updates(rt, state, rows(xq, sl), yq[sl])
        lrs[sl] = lr.cpu()
        writer.divide(sl, lrs[sl])
        copies = []
        for j in range(sl.stop - sl.start):
            pj = {k: v[j] for k, v in stacked.items()}
            bj = bufs[j] if bufs else None
            copies.append((pj, bj))
            q = qs + j
            drops[q] = (
                q_base[q] - rt.query_losses(state, pj, rows(xq, slice(q, q + 1)), yq[q : q + 1])[0]
            )
        for start, xb, yb in tr.batches(rt.plan.train_batch, rt.device):
            with torch.no_grad():  # as Runtime.losses_over, one training batch for every copy
                after = [rt.losses(rt.forward(state, p, xb, b, hot=True), yb) for p, b in copies]
            block = base[start : start + len(yb)].unsqueeze(1) - torch.stack(after, 1).cpu()
            writer.put(slice(start, start + len(yb)), sl, block)
    return writer.scores(drops, lrs, "generic")


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
