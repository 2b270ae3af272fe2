"""Extreme Hessian eigenvalues by power iteration on Hessian-vector products.

Used to pick step sizes that are principled rather than tuned on a demo: anchored mode steps at
1 / lambda_max, and chooses its number of steps from the most negative eigenvalue so that
negative-curvature directions of a non-convex model cannot blow up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Params = dict[str, torch.Tensor]


def _hvp(objective: Callable[[Params], torch.Tensor], params: Params) -> Callable[[Params], Params]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = objective(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    pairs = [(k, g) for k, g in zip(leaves, grads, strict=True) if g is not None]

    def apply(v: Params) -> Params:
        dot = sum((g * v[k]).sum() for k, g in pairs)
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
        norm = torch.sqrt(sum(x.double().pow(2).sum() for x in v.values()))
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
    iters: int = 30,
    seed: int = 0,
    with_min: bool = True,
) -> tuple[float, float]:
    """(lambda_max, lambda_min) of the Hessian of ``objective`` at ``params``.

    lambda_max by power iteration; lambda_min by power iteration on H - lambda_max I.
    Both are estimates (a few tens of HVPs); lambda_max is what step sizes need.
    """
    gen = torch.Generator().manual_seed(seed)
    apply = _hvp(objective, params)
    lam_max = _power(apply, params, 0.0, iters, gen)
    if lam_max <= 0 or not with_min:
        return lam_max, lam_max
    shifted = _power(apply, params, lam_max, iters, gen)
    return lam_max, min(lam_max, lam_max + shifted)
