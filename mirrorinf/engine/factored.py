"""Self-influence with linear layers as low-rank factors and every other parameter per example
under vmap: the fast path for CNNs, transformers and graphs loaded from pt2.

One SGD step on one example changes a linear layer by ``coef * sum_t delta_t a_t^T`` (``a``
its inputs, ``delta`` the loss gradient at its outputs, summed over tokens and calls), so the
updated layer is ``W x + (x A^T) D`` with the *shared* W. Under vmap each forward hook sees one
example's tensors, whatever the model's layout (sequence-first attention, batch folded into
tokens), so the factors need no batch bookkeeping. ``delta`` is the gradient of a zero "probe"
added to the layer's output, taken in the same ``grad_and_value`` pass as the loss at theta and
the per-example gradients of the remaining parameters (convolutions, norms, embeddings). No
per-example copy of a linear weight is built, differentiated, normed or read. Exact, not an
approximation; verified once per engine against the generic path before it is trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from mirrorinf.engine.examples import Examples, Inputs, each, move
from mirrorinf.engine.execution import Params
from mirrorinf.engine.generic import agrees_with_generic_self
from mirrorinf.engine.graph_view import ParamLinear
from mirrorinf.engine.runtime import ModelState, Runtime
from mirrorinf.engine.updates import batchable, stack_norm, step_lr

log = logging.getLogger(__name__)

Factors = dict[str, dict[str, Tensor]]  # site -> {"a": [r, in], "d": [r, out], "db": [out]}


@dataclass(frozen=True)
class Site:
    """A module computing ``linear(x, weight, bias)`` with trainable parameters of its own."""

    module: nn.Module
    weight: str | None  # full parameter names; None: not trainable (fixed)
    bias: str | None


def linear_sites(model: nn.Module, trainable: set[str]) -> dict[str, Site]:
    """Modules whose forward is a plain linear call on their own (untied) parameters."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    own = dict(model.named_parameters())
    sites = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ParamLinear):
            w_attr, b_attr = mod.weight_attr, mod.bias_attr
        elif isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
            w_attr, b_attr = "weight", "bias"
        else:
            continue
        prefix = f"{name}." if name else ""
        w, b = prefix + w_attr, prefix + b_attr
        if w not in own or w not in trainable or counts[id(own[w])] != 1:
            continue
        if b in own and counts[id(own[b])] != 1:
            continue
        sites[name] = Site(mod, w, b if b in own and b in trainable else None)
    return sites


@dataclass
class _Pass:
    mode: str = "off"  # off | shapes | probe | apply
    probes: dict[str, Tensor] = field(default_factory=dict)
    factors: Factors = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class FactoredPath:
    """Per-example SGD updates of linear layers as factors, the rest under vmap (see module
    docstring); ``verified``: None until checked against the generic path, then a verdict."""

    def __init__(self, rt: Runtime, sites: dict[str, Site]) -> None:
        self.rt = rt
        self.sites = sites
        self.names = {s.module: n for n, s in sites.items()}
        self.active = set(sites)  # sites the model really calls (found by the shapes pass)
        self.shapes: dict[str, tuple[int, ...]] | None = None
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
        if f is not None and "a" in f:
            xf = x.reshape(-1, x.shape[-1])
            new = new + ((xf @ f["a"].transpose(0, 1)) @ f["d"]).reshape(out.shape)
        if f is not None and "db" in f:
            new = new + f["db"]
        if st.mode == "shapes":
            st.shapes[key] = (*out.shape[:-1], x.shape[-1], out.shape[-1])
        elif st.mode == "probe":
            st.inputs[key] = x
            new = new + st.probes[key]
        return new

    def _forward_loss(self, state: ModelState, p: Params, xi: Inputs, yi: Tensor) -> Tensor:
        one = each(xi, lambda v: v.unsqueeze(0))
        return self.rt.losses(self.rt.forward(state, p, one), yi.unsqueeze(0))[0]

    def _find_shapes(self, state: ModelState, x: Inputs) -> dict[str, tuple[int, ...]]:
        """Each site call's output shape for one example (sites never called become dense)."""
        if self.shapes is None:
            with torch.no_grad(), self._hooks("shapes", {}, {}) as st:
                self.rt.forward(state, state.params, each(x, lambda v: v[:1]))
            self.shapes = st.shapes
            self.active = {k.rpartition("#")[0] for k in st.shapes}
        return self.shapes

    def numel(self, state: ModelState, x: Inputs) -> int:
        """Floats held per example: stacked dense parameters and linear factors."""
        shapes = self._find_shapes(state, x)
        dense = sum(v.numel() for k, v in state.params.items() if k not in self._factored())
        rows = sum(_rows(s) * (s[-2] + s[-1]) for s in shapes.values())
        return dense + 2 * self.rt.steps * rows

    def _factored(self) -> set[str]:
        out = set()
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
        probes = {k: torch.zeros(s[:-2] + s[-1:], dtype=rt.dtype, device=rt.device)
                  for k, s in shapes.items()}  # fmt: skip
        factors: Factors = {}
        lr = base = None
        for t in range(rt.steps):
            (g_dense, g_out), (loss, ins) = self._grads(state, fixed, dense, probes, factors, t)(
                xb, yb
            )
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
            factors = self._add_step(factors, grads, coef)
        assert lr is not None and base is not None
        after = self._after(state, fixed, dense, factors)(xb, yb)
        return base - after, lr

    def _grads(
        self,
        state: ModelState,
        fixed: Params,
        dense: Params,
        probes: Params,
        factors: Factors,
        t: int,
    ) -> Callable[[Inputs, Tensor], tuple[tuple[Params, Params], tuple[Tensor, Params]]]:
        """vmapped (dense grads, output grads), (loss, site inputs) of each example."""

        def f(dp: Params, pr: Params, fa: Factors, xi: Inputs, yi: Tensor) -> tuple[Tensor, Params]:
            with self._hooks("probe", pr, fa) as st:
                loss = self._forward_loss(state, {**fixed, **dp}, xi, yi)
                return loss, dict(st.inputs)

        g = grad_and_value(f, argnums=(0, 1), has_aux=True)
        dims = (0 if t else None, None, 0, 0, 0)

        def run(x: Inputs, y: Tensor) -> tuple[tuple[Params, Params], tuple[Tensor, Params]]:
            with batchable():
                out: tuple[tuple[Params, Params], tuple[Tensor, Params]] = vmap(
                    g, in_dims=dims, randomness="same"
                )(dense, probes, factors, x, y)
            return out

        return run

    def _after(
        self, state: ModelState, fixed: Params, dense: Params, factors: Factors
    ) -> Callable[[Inputs, Tensor], Tensor]:
        """vmapped loss of each example under its own updated parameters."""

        def h(dp: Params, fa: Factors, xi: Inputs, yi: Tensor) -> Tensor:
            with self._hooks("apply", {}, fa):
                return self._forward_loss(state, {**fixed, **dp}, xi, yi)

        def run(x: Inputs, y: Tensor) -> Tensor:
            with torch.no_grad(), batchable():
                out: Tensor = vmap(h, randomness="same")(dense, factors, x, y)
            return out

        return run

    def _site_grads(self, ins: Params, g_out: Params) -> dict[str, tuple[Tensor, Tensor]]:
        """Per site: (inputs [m, r, in], output gradients [m, r, out]) over all its calls."""
        parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for key, a in ins.items():
            name = key.rpartition("#")[0]
            d = g_out[key]
            m = a.shape[0]
            la, ld = parts.setdefault(name, ([], []))
            la.append(a.reshape(m, -1, a.shape[-1]))
            ld.append(d.reshape(m, -1, d.shape[-1]))
        return {n: (torch.cat(la, 1), torch.cat(ld, 1)) for n, (la, ld) in parts.items()}

    def _norm(self, g_dense: Params, grads: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Each example's full gradient norm, float64: dense parts and factor Gram products."""
        m = next(iter(grads.values()))[0].shape[0]
        total = stack_norm(g_dense).pow(2) if g_dense else torch.zeros(m, dtype=torch.float64)
        total = total.to(self.rt.device)
        for n, (a, d) in grads.items():
            s = self.sites[n]
            if s.weight is not None:
                ga = torch.bmm(a, a.transpose(1, 2)).double()
                gd = torch.bmm(d, d.transpose(1, 2)).double()
                total = total + (ga * gd).sum(dim=(1, 2))
            if s.bias is not None:
                total = total + d.sum(dim=1).double().pow(2).sum(dim=1)
        return total.sqrt()

    def _add_step(
        self, factors: Factors, grads: dict[str, tuple[Tensor, Tensor]], coef: Tensor
    ) -> Factors:
        """Append one SGD step ``theta += coef_j * grad_j`` to each example's factors."""
        out: Factors = {n: dict(f) for n, f in factors.items()}
        for n, (a, d) in grads.items():
            s = self.sites[n]
            f = out.setdefault(n, {})
            dc = d * coef.to(d.dtype).reshape(-1, 1, 1)
            if s.weight is not None:
                f["a"] = a if "a" not in f else torch.cat([f["a"], a], dim=1)
                f["d"] = dc if "d" not in f else torch.cat([f["d"], dc], dim=1)
            if s.bias is not None:
                db = dc.sum(dim=1)
                f["db"] = db if "db" not in f else f["db"] + db
        return out


def _per_row(coef: Tensor, like: Tensor) -> Tensor:
    """``coef`` [m] shaped to broadcast over a stacked tensor [m, ...]."""
    return coef.reshape(-1, *[1] * (like.ndim - 1))


def _rows(shape: tuple[int, ...]) -> int:
    """Rows (tokens) of one site call's output for one example."""
    r = 1
    for v in shape[:-2]:
        r *= v
    return r


__all__ = ["FactoredPath", "Site", "linear_sites"]
