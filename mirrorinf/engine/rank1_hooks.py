"""Exact low-rank (rank-1 per step and token) rewrite of SGD fit-on-query updates for models
whose weights are all Linear: the forward hooks.

One SGD step on one example changes a Linear layer by ``-lr * delta a^T`` (``delta`` = gradient
at the layer's output, ``a`` = its input; a sum over tokens for sequence inputs), so k steps
change it by a rank-(k*tokens) matrix. The perturbed layer is then ``W h + (h A^T) D`` with the
*shared* W: the training batch goes through one big shared matmul for all queries at once, and
the first layer (whose input is the same for every query) runs once. This is exact, not an
approximation; the engine verifies it against the generic path before trusting it on a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


class Unsupported(RuntimeError):
    """The model does something the rewrite cannot follow (the engine falls back)."""


@dataclass
class _Factors:
    a: torch.Tensor | None = None  # [m, r, in]
    d: torch.Tensor | None = None  # [m, r, out], already scaled by the step coefficient
    db: torch.Tensor | None = None  # [m, out]


@dataclass
class _State:
    mode: str = "off"  # off | diag | expand
    m: int = 0
    batch: int = 0
    capture: bool = False
    factors: dict[str, _Factors] = field(default_factory=dict)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def linear_modules(model: nn.Module, trainable: set[str]) -> dict[str, nn.Linear] | None:
    """Linear modules holding every trainable parameter, or None if any lives elsewhere."""
    found: dict[str, nn.Linear] = {}
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if full not in trainable:
                continue
            if type(mod) is not nn.Linear:
                return None
            found[mname] = mod
            covered.add(full)
    return found if covered == trainable and found else None


class Rank1Hooks:
    """Forward hooks that apply per-example low-rank Linear updates (see module docstring)."""

    def __init__(self, modules: dict[str, nn.Linear], trainable: set[str]):
        self.modules = modules
        self.names: dict[nn.Module, str] = {mod: name for name, mod in modules.items()}
        self.has_w = {n: (f"{n}.weight" if n else "weight") in trainable for n in modules}
        self.has_b = {n: (f"{n}.bias" if n else "bias") in trainable for n in modules}
        self.state = _State()

    @contextmanager
    def hooks(self) -> Iterator[Rank1Hooks]:
        handles = [mod.register_forward_hook(self._hook) for mod in self.modules.values()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.state = _State()

    # ---------------------------------------------------------------- configuration
    def reset(self, m: int) -> None:
        self.state.factors = {n: _Factors() for n in self.modules}
        self.state.m = m

    def set_mode(self, mode: str, *, batch: int = 0, capture: bool = False) -> None:
        self.state.mode, self.state.batch, self.state.capture = mode, batch, capture
        self.state.captured = {}

    # ---------------------------------------------------------------- the hook
    def _hook(
        self, mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor | None:
        st = self.state
        if st.mode == "off":
            return None
        name = self.names[mod]
        x = inputs[0]
        f = st.factors[name]
        m = st.m
        if st.mode == "diag":
            if x.shape[0] != m:
                raise Unsupported("batch dimension changed inside the model")
            new = out
            if f.a is not None and f.d is not None:
                xf = x.reshape(m, -1, x.shape[-1])
                corr = small_bmm(small_bmm(xf, f.a.transpose(1, 2)), f.d)
                new = new + corr.reshape(out.shape)
            if f.db is not None:
                new = new + f.db.reshape(m, *([1] * (out.ndim - 2)), -1)
            if st.capture:
                st.captured[name] = (x, new)
            return new
        # expand: every query's update applied to the whole (shared) training batch
        b = st.batch
        shared = x.shape[0] == b and m != 1
        if not shared and x.shape[0] != m * b:
            raise Unsupported("batch dimension changed inside the model")
        mid, n_out = out.shape[1:-1], out.shape[-1]
        folded = self._folded(f, x, m, shared)
        if shared:
            base = out.reshape(1, -1, n_out).expand(m, -1, n_out)
        else:
            base = out.reshape(m, -1, n_out)
        if folded is None:
            new = base.contiguous()
        elif torch.is_grad_enabled() or shared:
            new = torch.baddbmm(base, *folded)
        else:
            new = base.baddbmm_(*folded)  # fresh output of this layer: safe to update in place
        return new.reshape(m * b, *mid, n_out)

    @staticmethod
    def _folded(
        f: _Factors, x: torch.Tensor, m: int, shared: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(u, d) with u @ d = the low-rank correction, the bias change folded in as a column."""
        if f.a is None and f.db is None:
            return None
        xf = x.reshape(-1, x.shape[-1])
        rows = xf.shape[0] if shared else xf.shape[0] // m
        parts_u, parts_d = [], []
        if f.a is not None and f.d is not None:
            r = f.a.shape[1]
            if shared:
                u = (xf @ f.a.reshape(m * r, -1).T).reshape(rows, m, r).permute(1, 0, 2)
            else:
                u = torch.bmm(xf.reshape(m, rows, -1), f.a.transpose(1, 2))
            parts_u.append(u)
            parts_d.append(f.d)
        if f.db is not None:
            parts_u.append(torch.ones(m, rows, 1, dtype=x.dtype, device=x.device))
            parts_d.append(f.db.unsqueeze(1))
        if len(parts_u) == 1:
            return parts_u[0], parts_d[0]
        return torch.cat(parts_u, dim=2), torch.cat(parts_d, dim=1)

    # ---------------------------------------------------------------- factor bookkeeping
    def captured_grads(
        self, loss_sum: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-example (inputs, output-gradients) of each Linear, as [m, T, in] / [m, T, out]."""
        names = list(self.state.captured)
        outs = [self.state.captured[n][1] for n in names]
        grads = torch.autograd.grad(loss_sum, outs, allow_unused=True)
        m = self.state.m
        result = {}
        for n, g in zip(names, grads, strict=True):
            x, o = self.state.captured[n]
            if g is None:
                g = torch.zeros_like(o)
            result[n] = (
                x.detach().reshape(m, -1, x.shape[-1]),
                g.detach().reshape(m, -1, o.shape[-1]),
            )
        return result

    def grad_sqnorm(self, grads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Squared norm of each example's full parameter gradient, from the factors alone."""
        total = torch.zeros(self.state.m, dtype=torch.float64, device=_device(grads))
        for n, (a, d) in grads.items():
            if self.has_w[n]:
                ga = small_bmm(a, a.transpose(1, 2)).double()
                gd = small_bmm(d, d.transpose(1, 2)).double()
                total += (ga * gd).sum(dim=(1, 2))
            if self.has_b[n]:
                total += d.sum(dim=1).double().pow(2).sum(dim=1)
        return total

    def add_step(
        self, grads: dict[str, tuple[torch.Tensor, torch.Tensor]], coef: torch.Tensor
    ) -> None:
        """Append one SGD step ``theta += coef_j * grad_j`` (coef = -lr for descent)."""
        for n, (a, d) in grads.items():
            f = self.state.factors[n]
            dc = d * coef.to(d.dtype).reshape(-1, 1, 1)
            if self.has_w[n]:
                f.a = a if f.a is None else torch.cat([f.a, a], dim=1)
                f.d = dc if f.d is None else torch.cat([f.d, dc], dim=1)
            if self.has_b[n]:
                s = dc.sum(dim=1)
                f.db = s if f.db is None else f.db + s


def small_bmm(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(p, q)`` for [m, t, r] @ [m, r, n]; by broadcasting when t * r is tiny (one
    token, one step): m separate 1x1 matrix products cost far more than one multiply."""
    if p.shape[1] * p.shape[2] > 4:
        return torch.bmm(p, q)
    return (p.unsqueeze(-1) * q.unsqueeze(1)).sum(dim=2)


def _device(grads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.device:
    return next(iter(grads.values()))[0].device
