"""The two derived damping rules of benchmarks/anchored_defaults.py, against a hand computation
with torch.func.hessian on a small MLP (the README's table of them rests on these)."""

from __future__ import annotations

import torch

from benchmarks.anchored_defaults import RECIPE, deff_damping, ray_g_damping


def _case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, x, y, exact Hessian of the objective, its gradient), float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 3, (40,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def j(flat: torch.Tensor) -> torch.Tensor:
        parts, at = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            parts[name] = flat[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        out = torch.func.functional_call(model, parts, (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss + RECIPE.weight_decay / 2 * (flat**2).sum()

    return model, x, y, torch.func.hessian(j)(flat0), torch.func.grad(j)(flat0)


def test_ray_g_is_the_gradients_rayleigh_quotient() -> None:
    model, x, y, hess, g = _case()
    want = float(g @ hess @ g / (g @ g))
    assert abs(ray_g_damping(model, x, y) - want) <= 1e-9 * abs(want)


def test_deff_damping_gives_half_the_rows_as_effective_dimension() -> None:
    model, x, y, hess, _ = _case()
    lam = torch.linalg.eigvalsh(hess).abs()
    delta = deff_damping(model, x, y)
    assert delta is not None and delta > 0
    assert abs(float((lam / (lam + delta)).sum()) - len(y) / 2) < 1e-6
