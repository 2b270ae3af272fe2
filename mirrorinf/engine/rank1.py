"""The fast plain path: an exact rank-1 rewrite of SGD updates for ``nn.Linear`` models.

One SGD step on one example changes each Linear layer by a rank-1 matrix per token, so the
training set runs through the *shared* weights once for all queries of a chunk (see
:mod:`mirrorinf.engine.rank1_hooks`). Exact, not an approximation; verified once per engine
against the generic path before it is trusted.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mirrorinf.engine.examples import Examples, Inputs, move, rows
from mirrorinf.engine.execution import progress
from mirrorinf.engine.generic import agrees_with_generic_self, generic_pairwise
from mirrorinf.engine.rank1_hooks import Rank1Hooks, Unsupported, linear_modules
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, ScoreSink, ScoreWriter, in_memory
from mirrorinf.engine.updates import step_lr

log = logging.getLogger(__name__)


class Rank1Path:
    """The rank-1 fast path of one engine; ``verified``: None until checked, then a verdict."""

    def __init__(self, rt: Runtime, hooks: Rank1Hooks) -> None:
        self.rt = rt
        self.hooks = hooks
        self.verified: bool | None = None

    @classmethod
    def for_model(cls, rt: Runtime) -> Rank1Path | None:
        """The fast path if the config allows it (SGD, frozen BatchNorm statistics) and every
        trainable parameter lives in an nn.Linear; else None."""
        cfg = rt.config
        if cfg.fast_path != "auto" or cfg.optimizer != "sgd" or cfg.bn_update:
            return None
        mods = linear_modules(rt.model, rt.trainable)
        return None if mods is None else cls(rt, Rank1Hooks(mods, rt.trainable))

    def usable(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        base: torch.Tensor,
    ) -> bool:
        """Use the path if possible; verify it once against the generic path (a few rows)."""
        if self.verified is not None:
            return self.verified
        k, nb = min(2, len(yq)), min(16, len(tr))
        xs, ys = tr.take(slice(0, nb))
        small = Examples("train", x=xs, y=ys, n=nb)
        fast = in_memory(nb, k, np.float64)
        try:
            self.pairwise(state, small, rows(xq, slice(0, k)), yq[:k], base[:nb], fast)
        except Unsupported as exc:
            log.info("low-rank fast path not applicable (%s); using the generic path", exc)
            self.verified = False
            return False
        ref = in_memory(nb, k, np.float64)
        generic_pairwise(self.rt, state, small, rows(xq, slice(0, k)), yq[:k], base[:nb], ref)
        tol = 1e-3 * float(np.abs(ref).max()) + 1e-9
        self.verified = bool(np.abs(fast - ref).max() <= tol)
        if not self.verified:
            log.info("low-rank fast path disagreed with the generic path; using the generic path")
        return self.verified

    def usable_self(self, state: ModelState, tr: Examples) -> bool:
        """Use the path for self-influence if possible; verify it once against the generic
        path on the first rows (pairwise's check counts too)."""
        if self.verified is not None:
            return self.verified
        try:
            self.verified = agrees_with_generic_self(self.rt, state, tr, self.self_chunk)
        except Unsupported as exc:
            log.info("low-rank fast path not applicable (%s); using the generic path", exc)
            self.verified = False
            return False
        if not self.verified:
            log.info("low-rank fast path disagreed with the generic path; using the generic path")
        return self.verified

    def _updates(
        self, state: ModelState, hooks: Rank1Hooks, x: Inputs, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build each example's update factors; returns (lr, loss before)."""
        rt = self.rt
        x, y = move(x, rt.device), y.to(rt.device)
        hooks.reset(len(y))
        lr = None
        base = None
        params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        for _ in range(rt.steps):
            hooks.set_mode("diag", capture=True)
            losses = rt.losses(rt.forward(state, params, x), y)
            if base is None:
                base = losses.detach()
            grads = hooks.captured_grads(losses.sum())
            if lr is None:
                lr = step_lr(rt, state, hooks.grad_sqnorm(grads).sqrt())
            hooks.add_step(grads, -rt.sign * lr)
        assert lr is not None and base is not None
        return lr, base

    def pairwise(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        base: torch.Tensor,
        out: ScoreSink,
    ) -> Scores:
        """Plain pairwise scores [n_train, n_query] by the rank-1 rewrite, written into ``out``
        one block of training rows x a query chunk at a time."""
        rt = self.rt
        m = len(yq)
        writer = ScoreWriter.plain(rt.config, out)
        drops = torch.empty(m, dtype=torch.float64)
        lrs = torch.empty(m, dtype=torch.float64)
        qb = rt.plan.query_batch
        with self.hooks.hooks() as rank1:
            for qs in progress(range(0, m, qb), m, qb, "pairwise queries"):
                sl = slice(qs, min(qs + qb, m))
                k = sl.stop - sl.start
                lr, q_base = self._updates(state, rank1, rows(xq, sl), yq[sl])
                lrs[sl] = lr.cpu()
                writer.divide(sl, lrs[sl])
                with torch.no_grad():
                    rank1.set_mode("diag")
                    xqd, yqd = move(rows(xq, sl), rt.device), yq[sl].to(rt.device)
                    after_q = rt.losses(rt.forward(state, state.params, xqd), yqd)
                    drops[sl] = (q_base - after_q).cpu()
                    # k*rows rows per forward: as many as a plain forward of train_batch rows
                    for start, xb, yb in tr.batches(rt.plan.rows_per_copy(k), rt.device):
                        b = len(yb)
                        rank1.set_mode("expand", batch=b)
                        out = rt.forward(state, state.params, xb)
                        if out.shape[0] != k * b:
                            raise Unsupported("model output was not expanded over queries")
                        yk = yb.repeat(k, *[1] * (yb.ndim - 1))  # [k*b, ...], query-major
                        after = rt.losses(out, yk).reshape(k, b)
                        raw = (base[start : start + b].to(after.device) - after).T
                        writer.put(slice(start, start + b), sl, raw)
                rank1.set_mode("off")
        return writer.scores(drops, lrs, "lowrank")

    def self_chunk(
        self, state: ModelState, xb: Inputs, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw loss drops of a chunk of training rows after fitting each alone, and their lrs."""
        with self.hooks.hooks() as rank1:
            lr, base = self._updates(state, rank1, xb, yb)
            with torch.no_grad():
                rank1.set_mode("diag")
                after = self.rt.losses(self.rt.forward(state, state.params, xb), yb)
        return base - after, lr
