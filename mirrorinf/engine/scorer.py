"""The interface every scoring method implements, and the plain method.

A scorer answers the three verbs for one call's model state, on validated inputs, with
float64 ``Scores`` (pairwise: written block by block into the call's sink); the facade
(:mod:`mirrorinf.engine.facade`) does everything around it.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from mirrorinf.engine.examples import Examples, Inputs
from mirrorinf.engine.execution import progress
from mirrorinf.engine.factored import FactoredPath
from mirrorinf.engine.generic import SelfChunk, generic_pairwise, generic_self
from mirrorinf.engine.group_fit import group_fit
from mirrorinf.engine.rank1 import Rank1Path
from mirrorinf.engine.rank1_hooks import Unsupported
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.scores import Scores, ScoreSink, plain_scores


class Scorer(Protocol):
    """One scoring method. ``mode``: its name in reports; ``auto_dtype``: the dtype of
    precision="auto"; ``self_in_plain_twin``: self-influence is the plain twin's (the method
    has no per-example self-influence of its own); ``group_in_plain_twin``: likewise for group
    influence. ``curvature``: the set whose training
    objective a method's curvature comes from (None = ``tr``); methods without one ignore it."""

    mode: ClassVar[str]
    auto_dtype: ClassVar[torch.dtype]
    self_in_plain_twin: ClassVar[bool]
    group_in_plain_twin: ClassVar[bool]

    def pairwise(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        out: ScoreSink,
        curvature: Examples | None = None,
    ) -> Scores: ...

    def group(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        curvature: Examples | None = None,
    ) -> Scores: ...

    def self_influence(self, state: ModelState, tr: Examples) -> Scores: ...


class PlainScorer:
    """Fit-on-query steps on loss(q) alone: the rank-1 fast path where the model allows it and
    it agrees with the generic path, else the generic path; group influence by a group fit."""

    mode: ClassVar[str] = "plain"
    auto_dtype: ClassVar[torch.dtype] = torch.float32
    self_in_plain_twin: ClassVar[bool] = False
    group_in_plain_twin: ClassVar[bool] = False

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.fast = Rank1Path.for_model(rt)
        self.factored = FactoredPath.for_model(rt)

    def pairwise(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        out: ScoreSink,
        curvature: Examples | None = None,
    ) -> Scores:
        base = self.rt.base_losses(state, tr)
        if self.fast is not None and self.fast.usable(state, tr, xq, yq, base):
            return self.fast.pairwise(state, tr, xq, yq, base, out)
        return generic_pairwise(self.rt, state, tr, xq, yq, base, out)

    def group(
        self,
        state: ModelState,
        tr: Examples,
        xq: Inputs,
        yq: torch.Tensor,
        curvature: Examples | None = None,
    ) -> Scores:
        return group_fit(self.rt, state, tr, xq, yq)

    def self_influence(self, state: ModelState, tr: Examples) -> Scores:
        rt = self.rt
        out = torch.empty(len(tr), dtype=torch.float64)
        lrs = torch.empty(len(tr), dtype=torch.float64)
        path, chunk_fn = self._self_path(state, tr)
        cpu = rt.device.type == "cpu"
        if path == "lowrank":
            chunk = rt.plan.self_chunk(state.numel, stacked=False, cpu=cpu)
        elif path == "factored" and self.factored is not None:
            numel = self.factored.numel(state, tr.take(slice(0, 1))[0])
            chunk = rt.plan.self_chunk(numel, stacked=True, cpu=cpu)
        else:
            chunk = rt.plan.self_chunk(state.numel, stacked=True, cpu=cpu)
        for start, xb, yb in progress(
            tr.batches(chunk, rt.device), len(tr), chunk, "self-influence"
        ):
            s = lr = None
            if self.fast is not None and path == "lowrank":
                try:
                    s, lr = chunk_fn(state, xb, yb)
                except Unsupported:
                    self.fast.verified = False
                    path, chunk_fn = "generic", self._generic_self
            else:
                s, lr = chunk_fn(state, xb, yb)
            if s is None or lr is None:
                s, lr = generic_self(rt, state, xb, yb)
            out[start : start + len(yb)] = s.cpu()
            lrs[start : start + len(yb)] = lr.cpu()
        return plain_scores(rt.config, out.unsqueeze(1), None, lrs, path, per_row=True)

    def _self_path(self, state: ModelState, tr: Examples) -> tuple[str, SelfChunk]:
        """The self-influence path for this model: the rank-1 rewrite (all-Linear models), else
        linear layers as factors with the rest under vmap, else the generic path; each fast path
        is verified once against the generic one."""
        fast, fac = self.fast, self.factored
        if fast is not None and fast.verified is not False and fast.usable_self(state, tr):
            return "lowrank", fast.self_chunk
        if fac is not None and fac.usable_self(state, tr):
            return "factored", fac.self_chunk
        return "generic", self._generic_self

    def _generic_self(
        self, state: ModelState, xb: Inputs, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return generic_self(self.rt, state, xb, yb)
