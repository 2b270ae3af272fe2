"""Extreme Hessian eigenvalues by power iteration on Hessian-vector products.

Used to pick step sizes that are principled rather than tuned on a demo: anchored mode steps at
1 / lambda_max, and chooses its number of steps from the most negative eigenvalue so that
negative-curvature directions of a non-convex model cannot blow up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

from mirrorinf.engine.examples import Examples, parts

Params = dict[str, torch.Tensor]


def _hvp(objective: Callable[[Params], torch.Tensor], params: Params) -> Callable[[Params], Params]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = objective(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    pairs = [(k, g) for k, g in zip(leaves, grads, strict=True) if g is not None]

    def apply(v: Params) -> Params:
        dot = cast(torch.Tensor, sum((g * v[k]).sum() for k, g in pairs))
        hv = torch.autograd.grad(
            dot, [leaves[k] for k, _ in pairs], retain_graph=True, allow_unused=True
        )
        out = {k: torch.zeros_like(t) for k, t in params.items()}
        for (k, _), h in zip(pairs, hv, strict=True):
            if h is not None:
                out[k] = h.detach()
        return out

    return apply


def _power(
    apply: Callable[[Params], Params], like: Params, shift: float, iters: int, gen: torch.Generator
) -> float:
    """Dominant eigenvalue of (H - shift I) by power iteration (Rayleigh quotient)."""
    v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for k, t in like.items()}
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(cast(torch.Tensor, sum(x.double().pow(2).sum() for x in v.values())))
        v = {k: x / norm for k, x in v.items()}
        hv = apply(v)
        hv = {k: hv[k] - shift * v[k] for k in v}
        lam = float(sum((hv[k].double() * v[k].double()).sum() for k in v))
        v = hv
    return lam


def hessian_extremes(
    objective: Callable[[Params], torch.Tensor],
    params: Params,
    *,
    iters: int = 40,
    seed: int = 0,
    with_min: bool = True,
) -> tuple[float, float]:
    """(lambda_max, lambda_min) of the Hessian of ``objective`` at ``params``.

    Lanczos with full reorthogonalisation: its extreme Ritz values converge far faster than
    power iteration, which matters for lambda_min (the near-zero bulk of a trained network's
    spectrum hides small negative eigenvalues from shifted power iteration).
    """
    gen = torch.Generator().manual_seed(seed)
    apply = _hvp(objective, params)
    if not with_min:
        lam = _power(apply, params, 0.0, 20, gen)
        return lam, lam
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    dim = sum(sizes)
    iters = min(iters, dim)

    def flat(d: Params) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1).double() for n in names])

    def unflat(v: torch.Tensor) -> Params:
        parts = torch.split(v, sizes)
        return {
            n: p.reshape(sh).to(params[n]) for n, p, sh in zip(names, parts, shapes, strict=True)
        }

    device = next(iter(params.values())).device
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(iters):
        w = flat(apply(unflat(basis[j])))
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        for b in basis:  # full reorthogonalisation: cheap at this size, keeps Ritz values honest
            w = w - (w @ b) * b
        beta = float(w.norm())
        if beta < 1e-10 or j == iters - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(t)
    return float(ev[-1]), float(ev[0])


_CURVATURE_ROWS = 2048  # rows of the Hessian estimate (a subsample of larger training sets)


def curvature_rows(tr: Examples, seed: int) -> torch.Tensor:
    """Which training rows estimate the curvature: all of them up to _CURVATURE_ROWS; else, for
    in-memory data, those with the smallest seeded random projection of their content, in that
    order, so the estimate (and anchored scores) do not depend on the order of the rows. A
    streamed dataset gets a seeded random subset of positions."""
    n = len(tr)
    if n <= _CURVATURE_ROWS:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if tr.x is None or tr.y is None:
        return torch.randperm(n, generator=gen)[:_CURVATURE_ROWS].sort().values
    xs = parts(tr.x)
    d = sum(int(v[0].numel()) for v in xs)
    proj = torch.randn(d, generator=gen, dtype=torch.float64)
    keys = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, 65536):
        xb = torch.cat(
            [v[start : start + 65536].flatten(1).to("cpu", torch.float64) for v in xs], 1
        )
        yb = tr.y[start : start + 65536].reshape(len(xb), -1).to("cpu", torch.float64)
        keys[start : start + len(xb)] = xb @ proj + math.pi * yb.sum(dim=1)
    return torch.argsort(keys, stable=True)[:_CURVATURE_ROWS]
