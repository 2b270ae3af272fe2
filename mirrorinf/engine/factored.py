"""Self-influence with linear layers and embeddings as low-rank factors, conv weight gradients
by unfold, every other parameter per example under vmap: the fast path for CNNs, transformers,
text models and graphs loaded from pt2.

One SGD step on one example changes a linear layer by ``coef * sum_t delta_t a_t^T`` (``a``
its inputs, ``delta`` the loss gradient at its outputs, summed over tokens and calls), so the
updated layer is ``W x + (x A^T) D`` with the *shared* W. Under vmap each forward hook sees one
example's tensors, whatever the model's layout (sequence-first attention, batch folded into
tokens), so the factors need no batch bookkeeping. ``delta`` is the gradient of a zero "probe"
added to the layer's output, taken in the same ``grad_and_value`` pass as the loss at theta and
the per-example gradients of the remaining parameters (norms, unrecognised layers). An embedding's
factors are the token ids it read and its output gradients (the step moves those rows only; its
correction is an id-equality matrix times the gradients, never a vocabulary-sized copy). A weight
tied between linear and embedding calls (a language-model head sharing the token embedding)
keeps each use's factors: its step is their sum, so every use reads every use's factors and its
gradient norm adds the uses' cross terms, all Gram products of the factors. A conv layer
(Conv1d, Conv2d or Conv3d, grouped and depthwise included, "same" and asymmetric padding
too) gets a probe too: its per-example weight gradient is then one unfold (im2col) and a
batched matmul per group, not vmap's per-example convolution backward, and its updated weights
run as per-example copies; an
ungrouped conv whose weight outweighs its patches (few output positions: text) is a linear layer
over its unfolded patches instead, with (patches, output gradients) as factors. No per-example
copy of a linear or embedding weight is built, differentiated, normed or read.
Exact, not an approximation; verified once per engine against the generic path before it is
trusted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from mirrorinf.engine.examples import Examples, Inputs, each, move, parts
from mirrorinf.engine.execution import Params
from mirrorinf.engine.generic import agrees_with_generic_self
from mirrorinf.engine.graph_view import ParamLinear
from mirrorinf.engine.module_view import (
    EmbeddingTap,
    EngineEmbeddingBag,
    EngineMultiheadAttention,
)
from mirrorinf.engine.rank1_hooks import small_bmm
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.updates import batchable, stack_norm, step_lr

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
Factors = dict[str, dict[str, Tensor]]  # site -> {"a": [r, in], "d": [r, out], "db": [out]}


@dataclass(frozen=True)
class Site:
    """A module computing ``linear(x, weight, bias)`` (or a conv) with trainable parameters
    of its own."""

    module: nn.Module
    weight: str  # full parameter names
    bias: str | None  # None: no bias, or a fixed one
    conv: bool = False
    embed: bool = False  # an embedding: its factors are token ids and output gradients


def linear_sites(model: nn.Module, trainable: set[str]) -> dict[str, Site]:
    """Modules whose forward is a plain linear (or zero-padded conv1d/conv2d, or embedding) call
    on their own parameters, or on a weight tied between such linear and embedding calls only
    (a language-model head sharing the token embedding); a weight also held by any other layer
    stays dense."""
    holders: dict[int, int] = {}  # layers holding each parameter (fx's bare holders excluded)
    for mod in model.modules():
        if type(mod) is nn.Module:  # no forward: a graph's attribute holder, never called
            continue
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight's first name
    sites: dict[str, Site] = {}
    uses: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        site_name, call = name, mod
        if isinstance(mod, EngineMultiheadAttention):  # its in-projection, through its tap
            w_attr, b_attr = "in_proj_weight", "in_proj_bias"
            site_name, call = f"{prefix}in_proj", mod.in_tap
        elif isinstance(mod, EngineEmbeddingBag):  # its lookup, through its tap
            w_attr, b_attr = "weight", "bias"
            site_name, call = f"{prefix}lookup", mod.lookup_tap
        elif isinstance(mod, ParamLinear):
            w_attr, b_attr = mod.weight_attr, mod.bias_attr
        elif _plain_linear(mod) or _plain_conv(mod) or _plain_embedding(mod):
            w_attr, b_attr = "weight", "bias"
        else:
            continue
        wp, bp = mod._parameters.get(w_attr), mod._parameters.get(b_attr)
        if wp is None or names.get(id(wp)) not in trainable or site_name in sites:
            continue
        if bp is not None and holders.get(id(bp), 0) != 1:
            continue
        bias = names[id(bp)] if bp is not None and names[id(bp)] in trainable else None
        conv = isinstance(mod, _CONVS)
        embed = isinstance(mod, nn.Embedding | EngineEmbeddingBag)
        sites[site_name] = Site(call, names[id(wp)], bias, conv=conv, embed=embed)
        uses.setdefault(id(wp), []).append(site_name)
    for pid, used in uses.items():  # a tied weight: every holder a linear/embedding site
        if len(used) > 1 and (len(used) != holders.get(pid, 0) or any(sites[n].conv for n in used)):
            for n in used:
                del sites[n]
        elif len(used) == 1 and holders.get(pid, 0) != 1:
            del sites[used[0]]
    return sites


def _plain_linear(mod: nn.Module) -> bool:
    """An nn.Linear (or subclass) that runs nn.Linear's own forward."""
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def _plain_embedding(mod: nn.Module) -> bool:
    """An nn.Embedding whose weight gradient is its output gradients scattered to the rows of
    the tokens read (no max_norm renormalisation, no frequency scaling)."""
    return type(mod) is nn.Embedding and mod.max_norm is None and not mod.scale_grad_by_freq


def _plain_conv(mod: nn.Module) -> bool:
    """An nn.Conv1d, Conv2d or Conv3d (grouped and depthwise included; any zero padding, "same"
    and "valid" too) whose per-example weight gradient is one unfold and batched matmul away."""
    return type(mod) in _CONVS and mod.padding_mode == "zeros"


@dataclass
class _Pass:
    mode: str = "off"  # off | shapes | probe | apply
    probes: dict[str, Tensor] = field(default_factory=dict)
    factors: Factors = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each call's output
    sizes: dict[str, int] = field(default_factory=dict)  # floats of its factors, one example
    patches: dict[str, int] = field(default_factory=dict)  # a conv's, as patch factors


class FactoredPath:
    """Per-example SGD updates of linear layers as factors, the rest under vmap (see module
    docstring); ``verified``: None until checked against the generic path, then a verdict."""

    def __init__(self, rt: Runtime, sites: dict[str, Site]) -> None:
        self.rt = rt
        self.sites = sites
        self.names = {s.module: n for n, s in sites.items()}
        by_weight: dict[str, list[str]] = {}
        for n, s in sites.items():
            by_weight.setdefault(s.weight, []).append(n)
        # sites sharing a weight (an LM head tied to the embedding): each applies all their steps
        self.tied = {n: group for group in by_weight.values() if len(group) > 1 for n in group}
        self.active = set(sites)  # sites the model really calls (found by the shapes pass)
        # convs run with per-example weight copies; the others (few output positions, big
        # ungrouped weights: text) as low-rank factors of their unfolded patches, like linears
        self.moved = {n for n, s in sites.items() if s.conv}
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.sizes: dict[str, int] = {}
        self._shapes_of: tuple[object, ...] | None = None  # the row shape they were found for
        self.verified: bool | None = None
        self._pass = _Pass()

    @classmethod
    def for_model(cls, rt: Runtime) -> FactoredPath | None:
        """The path if the config allows it (SGD, frozen BatchNorm statistics) and the model has
        at least one linear layer with trainable parameters; else None."""
        cfg = rt.config
        if cfg.fast_path != "auto" or cfg.optimizer != "sgd" or cfg.bn_update:
            return None
        sites = linear_sites(rt.model, rt.trainable)
        return cls(rt, sites) if sites else None

    def usable_self(self, state: ModelState, tr: Examples) -> bool:
        """Use the path if vmap can batch the model and it agrees with the generic path on the
        first rows (checked once per engine)."""
        if self.verified is None:
            try:
                self.verified = agrees_with_generic_self(self.rt, state, tr, self.self_chunk)
            except Exception as exc:  # an op vmap cannot batch, a hook it cannot follow
                log.info("factored self-influence not applicable (%s); using the generic path",
                         str(exc).split("\n")[0][:200])  # fmt: skip
                self.verified = False
            else:
                if not self.verified:
                    log.info("factored self-influence disagreed with the generic path; "
                             "using the generic path")  # fmt: skip
        return self.verified

    # ---------------------------------------------------------------- hooks
    @contextmanager
    def _hooks(self, mode: str, probes: Params, factors: Factors) -> Iterator[_Pass]:
        self._pass = _Pass(mode, probes, factors)
        handles = [s.module.register_forward_hook(self._hook) for s in self.sites.values()]
        try:
            yield self._pass
        finally:
            for h in handles:
                h.remove()
            self._pass = _Pass()

    def _hook(self, mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        st = self._pass
        name = self.names[mod]
        if name not in self.active:
            return None
        x = inputs[0]
        call = st.calls.get(name, 0)
        st.calls[name] = call + 1
        key = f"{name}#{call}"
        f = st.factors.get(name)
        new = out
        for member in self.tied.get(name, (name,)):  # the steps of every use of the weight
            fm = st.factors.get(member)
            if fm is not None and "a" in fm:
                new = self._effect(mod, self.sites[name], self.sites[member], x, new, fm)
        if f is not None and "db" in f and self.sites[name].conv:
            new = new + f["db"].reshape(-1, *[1] * _spatial(mod))
        elif f is not None and "db" in f:
            new = new + f["db"]
        if st.mode == "shapes":
            st.shapes[key] = tuple(out.shape)
            if self.sites[name].conv:  # its per-example weights (moved) and bias
                assert isinstance(mod, _CONVS)
                w = mod.weight
                st.sizes[key] = out.shape[-1 - _spatial(mod)] + (w.numel() if call == 0 else 0)
                positions = out.numel() // out.shape[-1 - _spatial(mod)]  # x calls, batch 1
                st.patches[key] = positions * (w[0].numel() + w.shape[0])
            elif self.sites[name].embed:  # a token id and an output gradient per token
                st.sizes[key] = x.numel() * (1 + out.shape[-1])
            else:
                st.sizes[key] = out.numel() // out.shape[-1] * (x.shape[-1] + out.shape[-1])
        elif st.mode == "probe":
            st.inputs[key] = x
            new = new + st.probes[key].to(out.dtype)  # autocast: the layer's own dtype
        return new

    @staticmethod
    def _effect(
        mod: nn.Module, site: Site, src: Site, x: Tensor, out: Tensor, f: dict[str, Tensor]
    ) -> Tensor:
        """One call's output ``out`` (input ``x``) plus the change by the weight steps of
        ``src``'s factors ``f`` (``src`` is ``site`` or a site tied to its weight): linear factors
        are (inputs, output gradients), embedding ones (token ids, output gradients)."""
        if site.embed and src.embed:  # rows of the tokens moved
            same = x.reshape(-1, 1) == f["a"].reshape(1, -1)  # [tokens, r]
            return out + (same.to(f["d"].dtype) @ f["d"]).reshape(out.shape)
        if site.embed:  # a tied linear's step d^T a, read at the rows of the tokens
            rows = f["d"][:, x.reshape(-1)]  # [r, tokens]
            return out + (rows.transpose(0, 1) @ f["a"]).reshape(out.shape)
        if site.conv:  # over unfolded patches
            assert isinstance(mod, _CONVS)
            cols = _patches(mod, x)  # [b, L, C*k]
            corr = (cols.flatten(0, 1) @ f["a"].transpose(0, 1)) @ f["d"]  # [b*L, out]
            corr = corr.reshape(cols.shape[0], cols.shape[1], -1).transpose(1, 2)
            return out + corr.reshape(out.shape)
        xf = x.reshape(-1, x.shape[-1])
        if src.embed:  # a tied embedding's step onehot(ids)^T g, read by this linear:
            dots = xf @ f["d"].transpose(0, 1)  # [tokens, r], added at the columns of the ids
            ids = f["a"].reshape(1, -1).expand(dots.shape[0], -1)
            flat = out.reshape(dots.shape[0], out.shape[-1])
            return flat.scatter_add(1, ids, dots.to(out.dtype)).reshape(out.shape)
        return out + ((xf @ f["a"].transpose(0, 1)) @ f["d"]).reshape(out.shape)

    def _forward_loss(self, state: ModelState, p: Params, xi: Inputs, yi: Tensor) -> Tensor:
        one = each(xi, lambda v: v.unsqueeze(0))
        return self.rt.losses(self.rt.forward(state, p, one), yi.unsqueeze(0))[0]

    def _find_shapes(self, state: ModelState, x: Inputs) -> dict[str, tuple[int, ...]]:
        """Each site call's output shape for one example (sites never called become dense),
        found again when the rows' shape changes (another sequence length, image size)."""
        row_shape = tuple((v.shape[1:], v.dtype) for v in parts(x))
        if self.shapes is None or row_shape != self._shapes_of:
            self._shapes_of = row_shape
            with torch.no_grad(), self._hooks("shapes", {}, {}) as st:
                self.rt.forward(state, state.params, each(x, lambda v: v[:1]))
            self.shapes, self.sizes = st.shapes, st.sizes
            self.active = {k.rpartition("#")[0] for k in st.shapes}
            self.moved = set()
            for n in self.active:
                mod, keys = self.sites[n].module, [k for k in st.patches if k.startswith(n + "#")]
                if not keys:
                    continue
                weights = sum(self.sizes[k] for k in keys)
                if getattr(mod, "groups", 1) > 1 or sum(st.patches[k] for k in keys) >= weights:
                    self.moved.add(n)
                else:
                    self.sizes.update({k: st.patches[k] for k in keys})
        return self.shapes

    def numel(self, state: ModelState, x: Inputs) -> int:
        """Floats held per example: stacked dense parameters and linear factors."""
        self._find_shapes(state, x)
        dense = sum(v.numel() for k, v in state.params.items() if k not in self._factored())
        return dense + 2 * self.rt.steps * sum(self.sizes.values())

    def _factored(self) -> set[str]:
        """Parameters not dense: the factored sites'."""
        out: set[str] = set()
        for n in self.active:
            s = self.sites[n]
            out |= {p for p in (s.weight, s.bias) if p is not None}
        return out

    # ---------------------------------------------------------------- self-influence
    def self_chunk(self, state: ModelState, xb: Inputs, yb: Tensor) -> tuple[Tensor, Tensor]:
        """Raw loss drops of a chunk of training rows after fitting each alone, and their lrs."""
        rt = self.rt
        xb, yb = move(xb, rt.device), yb.to(rt.device)
        shapes = self._find_shapes(state, xb)
        fac_names = self._factored()
        fixed = {k: v for k, v in state.params.items() if k in fac_names}
        dense: Params = {k: v for k, v in state.params.items() if k not in fac_names}
        probes = {k: torch.zeros(s, dtype=rt.dtype, device=rt.device) for k, s in shapes.items()}
        factors: Factors = {}
        moved: Params = {}  # conv parameters, per example once they moved (not differentiated)
        lr = base = None
        for t in range(rt.steps):
            grad_fn = self._grads(state, fixed, dense, moved, probes, factors, t)
            (g_dense, g_out), (loss, ins) = grad_fn(xb, yb)
            if base is None:
                base = loss
            grads = self._site_grads(ins, g_out)
            if lr is None:
                lr = step_lr(rt, state, self._norm(g_dense, grads))
            coef = (-rt.sign * lr).to(rt.dtype)
            dense = {  # theta (shared, first step) or each example's copy, plus its step
                k: torch.addcmul(v if t else v.unsqueeze(0), _per_row(coef, g_dense[k]), g_dense[k])
                for k, v in dense.items()
            }
            moved = self._move_convs(fixed, moved, grads, coef)
            factors = self._add_step(factors, grads, coef)
        assert lr is not None and base is not None
        after = self._after(state, fixed, dense, moved, factors)(xb, yb)
        return base - after, lr

    def _move_convs(
        self, fixed: Params, moved: Params, grads: dict[str, tuple[Tensor, Tensor]], coef: Tensor
    ) -> Params:
        """Each example's conv parameters after this step: a grouped conv per example reads
        them once in the next forward (cheaper than a correction conv on top of the shared
        one)."""
        out = dict(moved)
        for n, (dw, db) in grads.items():
            s = self.sites[n]
            if n not in self.moved:
                continue
            for name, g in ((s.weight, dw), (s.bias, db)):
                if name is not None:
                    prev = moved.get(name, fixed[name].unsqueeze(0))
                    out[name] = torch.addcmul(prev, _per_row(coef, g), g)
        return out

    def _grads(
        self,
        state: ModelState,
        fixed: Params,
        dense: Params,
        moved: Params,
        probes: Params,
        factors: Factors,
        t: int,
    ) -> Callable[[Inputs, Tensor], tuple[tuple[Params, Params], tuple[Tensor, Params]]]:
        """vmapped (dense grads, output grads), (loss, site inputs) of each example."""

        def f(
            dp: Params, pr: Params, mv: Params, fa: Factors, xi: Inputs, yi: Tensor
        ) -> tuple[Tensor, Params]:
            with self._hooks("probe", pr, fa) as st:
                loss = self._forward_loss(state, {**fixed, **mv, **dp}, xi, yi)
                return loss, dict(st.inputs)

        g = grad_and_value(f, argnums=(0, 1), has_aux=True)
        dims = (0 if t else None, None, 0, 0, 0, 0)

        def run(x: Inputs, y: Tensor) -> tuple[tuple[Params, Params], tuple[Tensor, Params]]:
            with batchable():
                out: tuple[tuple[Params, Params], tuple[Tensor, Params]] = vmap(
                    g, in_dims=dims, randomness="same"
                )(dense, probes, moved, factors, x, y)
            return out

        return run

    def _after(
        self, state: ModelState, fixed: Params, dense: Params, moved: Params, factors: Factors
    ) -> Callable[[Inputs, Tensor], Tensor]:
        """vmapped loss of each example under its own updated parameters."""

        def h(dp: Params, fa: Factors, xi: Inputs, yi: Tensor) -> Tensor:
            with self._hooks("apply", {}, fa):
                return self._forward_loss(state, {**fixed, **dp}, xi, yi)

        def run(x: Inputs, y: Tensor) -> Tensor:
            with torch.no_grad(), batchable():
                out: Tensor = vmap(h, randomness="same")({**dense, **moved}, factors, x, y)
            return out

        return run

    def _site_grads(self, ins: Params, g_out: Params) -> dict[str, tuple[Tensor, Tensor]]:
        """Per linear site: (inputs [m, r, in], output gradients [m, r, out]) over all its
        calls; per embedding: (token ids [m, r], output gradients [m, r, dim]); per conv site:
        (weight gradient [m, *weight], output gradients summed [m, out])."""
        parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for key, a in ins.items():
            name = key.rpartition("#")[0]
            d = g_out[key]
            m = a.shape[0]
            la, ld = parts.setdefault(name, ([], []))
            mod = self.sites[name].module
            if self.sites[name].conv and name not in self.moved:  # patches and gradients
                assert isinstance(mod, _CONVS)
                la.append(_patches(mod, a).reshape(m, -1, mod.weight[0].numel()))
                out_ch, k = d.shape[-1 - _spatial(mod)], _spatial(mod)
                ld.append(d.reshape(m, -1, out_ch, math.prod(d.shape[-k:])).transpose(2, 3))
                ld[-1] = ld[-1].reshape(m, -1, out_ch)
            elif self.sites[name].conv:
                assert isinstance(mod, _CONVS)
                la.append(_conv_weight_grad(mod, a, d))
                k = _spatial(mod)
                ld.append(
                    d.reshape(m, -1, d.shape[-1 - k], math.prod(d.shape[-k:])).sum(dim=(1, 3))
                )
            elif self.sites[name].embed:
                assert isinstance(mod, nn.Embedding | EmbeddingTap)
                ids, d = a.reshape(m, -1), d.reshape(m, -1, d.shape[-1])
                if mod.padding_idx is not None:  # that row never moves
                    d = d * (ids != mod.padding_idx).unsqueeze(-1).to(d.dtype)
                la.append(ids)
                ld.append(d)
            else:
                la.append(a.reshape(m, -1, a.shape[-1]))
                ld.append(d.reshape(m, -1, d.shape[-1]))
        out = {}
        for n, (la, ld) in parts.items():
            if len(la) == 1:  # one call: no copy
                out[n] = (la[0], ld[0])
            elif n in self.moved:
                out[n] = (torch.stack(la).sum(0), torch.stack(ld).sum(0))
            else:
                out[n] = (torch.cat(la, 1), torch.cat(ld, 1))
        return out

    def _norm(self, g_dense: Params, grads: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Each example's full gradient norm, float64: dense parts and factor Gram products."""
        m = next(iter(grads.values()))[0].shape[0]
        total = stack_norm(g_dense).pow(2) if g_dense else torch.zeros(m, dtype=torch.float64)
        total = total.to(self.rt.device)
        for n, (a, d) in grads.items():
            s = self.sites[n]
            if n in self.moved:  # (weight gradient, bias gradient)
                total = total + torch.linalg.vector_norm(a.flatten(1), dim=1).double().pow(2)
                if s.bias is not None:
                    total = total + d.double().pow(2).sum(dim=1)
                continue
            if s.embed:  # rows of the same token add up: an equality "Gram" of the ids
                ga = (a.unsqueeze(2) == a.unsqueeze(1)).double()
                gd = small_bmm(d, d.transpose(1, 2)).double()
                total = total + (ga * gd).sum(dim=(1, 2))
            elif s.weight is not None:
                ga = small_bmm(a, a.transpose(1, 2)).double()
                gd = small_bmm(d, d.transpose(1, 2)).double()
                total = total + (ga * gd).sum(dim=(1, 2))
            if s.bias is not None:
                total = total + d.sum(dim=1).double().pow(2).sum(dim=1)
        done = set()
        for n in grads:  # a tied weight's gradient is the sum of its uses': their cross terms
            done.add(n)
            for o in self.tied.get(n, ()):
                if o not in done and o in grads:
                    total = total + 2 * _cross(self.sites[n], grads[n], self.sites[o], grads[o])
        return total.sqrt()

    def _add_step(
        self, factors: Factors, grads: dict[str, tuple[Tensor, Tensor]], coef: Tensor
    ) -> Factors:
        """Append one SGD step ``theta += coef_j * grad_j`` to each example's factors."""
        out: Factors = {n: dict(f) for n, f in factors.items()}
        for n, (a, d) in grads.items():
            s = self.sites[n]
            if n in self.moved:  # moved with the per-example parameters instead (_move_convs)
                continue
            f = out.setdefault(n, {})
            dc = d * coef.to(d.dtype).reshape(-1, 1, 1)
            if s.weight is not None:
                f["a"] = a if "a" not in f else torch.cat([f["a"], a], dim=1)
                f["d"] = dc if "d" not in f else torch.cat([f["d"], dc], dim=1)
            if s.bias is not None:
                db = dc.sum(dim=1)
                f["db"] = db if "db" not in f else f["db"] + db
        return out


def _cross(s1: Site, g1: tuple[Tensor, Tensor], s2: Site, g2: tuple[Tensor, Tensor]) -> Tensor:
    """Each example's <G1, G2> of two uses' weight gradients, float64, from Gram products of
    their factors: a linear use's G = d^T a (output gradients, inputs), an embedding use's
    G = onehot(ids)^T g; no weight-sized per-example tensor."""
    if s1.embed and not s2.embed:
        s1, g1, s2, g2 = s2, g2, s1, g1
    (a1, d1), (a2, d2) = g1, g2
    if s1.embed and s2.embed:
        rows = (a1.unsqueeze(2) == a2.unsqueeze(1)).to(d1.dtype)
        cols = small_bmm(d1, d2.transpose(1, 2))
    elif s2.embed:  # a linear (a1 inputs, d1 output gradients) and an embedding (a2 ids, d2)
        rows = d1.gather(2, a2.unsqueeze(1).expand(-1, d1.shape[1], -1))  # d1[i, ids_j]
        cols = small_bmm(a1, d2.transpose(1, 2))
    else:
        rows = small_bmm(d1, d2.transpose(1, 2))
        cols = small_bmm(a1, a2.transpose(1, 2))
    return (rows.double() * cols.double()).sum(dim=(1, 2))


def _per_row(coef: Tensor, like: Tensor) -> Tensor:
    """``coef`` [m] shaped to broadcast over a stacked tensor [m, ...]."""
    return coef.reshape(-1, *[1] * (like.ndim - 1))


def _spatial(mod: nn.Module) -> int:
    """Spatial dimensions of a conv layer: 1, 2 or 3."""
    return len(mod.kernel_size) if isinstance(mod, _CONVS) else 2


def _pads(mod: Conv) -> list[tuple[int, int]]:
    """Zeros before and after each spatial dimension: ``padding="same"`` puts the odd one
    after, as torch does."""
    if mod.padding == "valid":
        return [(0, 0)] * len(mod.kernel_size)
    if mod.padding == "same":
        total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in cast("tuple[int, ...]", mod.padding)]


def _windows(mod: Conv, x: Tensor) -> Tensor:
    """Each output position's receptive field as a strided view of the zero-padded input:
    ``x`` [b, C, *spatial] -> [b, C, *positions, *kernel] (one copy: the padding)."""
    pads = _pads(mod)
    x = nn.functional.pad(x, [p for pair in reversed(pads) for p in pair])
    for i, (kernel, dilation, stride) in enumerate(
        zip(mod.kernel_size, mod.dilation, mod.stride, strict=True)
    ):
        span = dilation * (kernel - 1) + 1
        x = x.unfold(2 + i, span, stride)  # window appended last
        if dilation > 1:
            x = x[..., ::dilation]
    return x  # [b, C, *L, *k]


def _unfold2d(mod: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col of a Conv2d's input [b, C, H, W] -> [b, C*kh*kw, L] (asymmetric padding first)."""
    pads = _pads(mod)
    if any(a != b for a, b in pads):
        x = nn.functional.pad(x, [p for pair in reversed(pads) for p in pair])
        padding: tuple[int, ...] = (0, 0)
    else:
        padding = tuple(a for a, _ in pads)
    return nn.functional.unfold(x, mod.kernel_size, mod.dilation, padding, mod.stride)


def _patches(mod: Conv, x: Tensor) -> Tensor:
    """The unfolded inputs of an ungrouped conv: ``x`` [..., C, *spatial] -> [b, L, C*k]."""
    k = _spatial(mod)
    x = x.reshape(-1, *x.shape[-1 - k :])
    if isinstance(mod, nn.Conv2d):
        return _unfold2d(mod, x).transpose(1, 2)
    win = _windows(mod, x)  # a strided window view and one copy (im2col is slower)
    order = (0, *range(2, 2 + k), 1, *range(2 + k, 2 + 2 * k))  # [b, *L, C, *k]
    return win.permute(order).reshape(win.shape[0], -1, win.shape[1] * mod.weight[0, 0].numel())


def _conv_weight_grad(mod: Conv, x: Tensor, d: Tensor) -> Tensor:
    """Each example's weight gradient of one conv call: output gradients times the unfolded
    inputs (im2col), one batched matmul per group.
    ``x`` [m, ..., C, *spatial], ``d`` [m, ..., out, *spatial']."""
    m, groups, k = x.shape[0], mod.groups, _spatial(mod)
    x = x.reshape(-1, *x.shape[-1 - k :])
    if isinstance(mod, nn.Conv2d):
        cols = _unfold2d(mod, x)  # [m*calls, C*kh*kw, L], channels outermost
    else:
        win = _windows(mod, x)  # [b, C, *L, *k] -> [b, C*k, L]
        order = (0, 1, *range(2 + k, 2 + 2 * k), *range(2, 2 + k))
        cols = win.permute(order).reshape(win.shape[0], win.shape[1] * mod.weight[0, 0].numel(), -1)
    cols = cols.reshape(m, -1, groups, cols.shape[1] // groups, cols.shape[2])
    cols = cols.permute(0, 2, 3, 1, 4).flatten(3)  # [m, g, C/g*k, calls*L]
    out = d.shape[-1 - k]
    g = d.reshape(m, -1, groups, out // groups, math.prod(d.shape[-k:]))
    g = g.permute(0, 2, 3, 1, 4).flatten(3)  # [m, g, out/g, calls*L]
    if out == groups:  # depthwise: one output channel per group, no matmul to batch
        w = (g * cols).sum(-1).unsqueeze(2)
    else:
        w = torch.matmul(g, cols.transpose(-1, -2))  # [m, g, out/g, C/g*k]
    return w.reshape(m, *mod.weight.shape)


__all__ = ["FactoredPath", "Site", "linear_sites"]
