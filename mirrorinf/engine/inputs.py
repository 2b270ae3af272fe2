"""Checks of targets against the model, and query preparation (the optional sphere lift)."""

from __future__ import annotations

import torch

from mirrorinf.engine.examples import Examples
from mirrorinf.engine.runtime import ModelState, Runtime


def check_train(rt: Runtime, state: ModelState, tr: Examples) -> None:
    """check_targets on the first training rows (at most one batch)."""
    x, y = tr.take(slice(0, min(len(tr), 256, rt.plan.train_batch)))
    check_targets(rt, state, x, y, "train")


def check_targets(
    rt: Runtime, state: ModelState, x: torch.Tensor, y: torch.Tensor, name: str
) -> None:
    """Validate targets against the model's outputs once, outside any vmap."""
    x, y = x.to(rt.device), y.to(rt.device)
    try:
        with torch.no_grad():
            out = rt.forward(state, state.params, x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ValueError(
            f"the model's forward failed on {name} inputs of shape {tuple(x.shape)}: {exc}. "
            "Check that the features match what the model was trained on"
        ) from exc
    if rt.default_loss:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(
                f"{name} labels have dtype {y.dtype}; the default cross-entropy needs integer "
                "class indices (pass loss_fn for other targets)"
            )
        if out.ndim != 2:
            raise ValueError(
                f"the model returns outputs of shape {tuple(out.shape)}; the default loss "
                "expects [batch, classes] logits (pass loss_fn for other outputs)"
            )
        n_cls = out.shape[1]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_cls:
            raise ValueError(
                f"{name} labels must lie in [0, {n_cls - 1}] for this model's {n_cls} outputs; "
                f"found labels in [{lo}, {hi}]"
            )
    losses = rt.losses(out, y)
    if losses.shape != (len(y),):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [{len(y)}]), got "
            f"{tuple(losses.shape)}; use reduction='none'"
        )


def prepare_queries(
    rt: Runtime, state: ModelState, qs: Examples
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise queries (small) and, if configured, lift already-fit ones off zero loss."""
    xq, yq = qs.materialise()
    check_targets(rt, state, xq, yq, "queries")
    sph = rt.config.sphere
    if sph is None or not xq.is_floating_point():
        return xq, yq
    gen = torch.Generator().manual_seed(rt.config.seed)
    xq = xq.clone()
    loss = rt.query_losses(state, state.params, xq, yq)
    radius = torch.full((len(xq),), sph.radius, dtype=torch.float64)
    x0 = xq.clone()
    ones = [1] * (x0.ndim - 1)
    for _ in range(sph.max_tries):
        low = loss < sph.loss_floor
        if not bool(low.any()):
            break
        idx = low.nonzero().flatten()
        noise = torch.randn(x0[idx].shape, generator=gen, dtype=x0.dtype)
        noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *ones)
        scale = x0[idx].flatten(1).norm(dim=1).clamp_min(1.0) * radius[idx]
        xq[idx] = x0[idx] + noise * scale.to(x0.dtype).reshape(-1, *ones)
        loss[idx] = rt.query_losses(state, state.params, xq[idx], yq[idx])
        radius[idx] *= sph.growth
    return xq, yq
