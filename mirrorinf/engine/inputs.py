"""Checks of targets against the model, and query preparation (the optional sphere lift)."""

from __future__ import annotations

import torch

from mirrorinf.engine.examples import Examples, Inputs, describe, move
from mirrorinf.engine.losses import IGNORE_INDEX
from mirrorinf.engine.runtime import ModelState, Runtime


def check_train(rt: Runtime, state: ModelState, tr: Examples) -> None:
    """check_targets on the first training rows (at most one batch)."""
    x, y = tr.take(slice(0, min(len(tr), 256, rt.plan.train_batch)))
    check_targets(rt, state, x, y, "train")


def check_targets(rt: Runtime, state: ModelState, x: Inputs, y: torch.Tensor, name: str) -> None:
    """Validate targets against the model's outputs and the task kind once, outside any vmap."""
    x, y = move(x, rt.device), y.to(rt.device)
    try:
        with torch.no_grad():
            out = rt.forward(state, state.params, x)
    except torch.OutOfMemoryError:
        raise
    except ValueError:  # the output selector's own message (task.output)
        raise
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ValueError(
            f"the model's forward failed on {name} inputs ({describe(x)}): {exc}. "
            "Check that the features match what the model was trained on"
        ) from exc
    if rt.default_loss:
        problem = kind_problem(rt.kind, out, y)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    losses = rt.losses(out, y)
    if losses.shape != (len(y),):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [{len(y)}]), got "
            f"{tuple(losses.shape)}; use reduction='none'"
        )


def _is01(y: torch.Tensor) -> bool:
    return bool(((y == 0) | (y == 1)).all())


def _is_int_valued(y: torch.Tensor) -> bool:
    return not y.is_floating_point() or bool((y == y.round()).all())


def suggest_kind(out: torch.Tensor, y: torch.Tensor) -> str | None:
    """The task kind that fits these outputs and targets (None when none clearly does)."""
    n = len(y)
    width = out[0].numel() if n else 0
    if out.ndim == 3 and y.ndim == 2 and out.shape[:2] == y.shape and _is_int_valued(y):
        return "sequence"
    if y.ndim == 2 and y.shape[1] > 1 and out.reshape(n, -1).shape[1] == y.shape[1]:
        return "multilabel" if _is01(y) else "regression"
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        if width == 1:
            return "binary" if _is01(y) else "regression"
        if out.ndim == 2 and _is_int_valued(y) and int(y.min()) >= 0 and int(y.max()) < width:
            return "classification"
    return None


def _target_words(y: torch.Tensor) -> str:
    if _is01(y):
        return "the targets are 0/1"
    if not _is_int_valued(y):
        return "the targets are real numbers"
    return f"the targets are integers in [{int(y.min())}, {int(y.max())}]"


def kind_problem(kind: str, out: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``out`` and ``y`` do not fit task ``kind`` (with the kind that would), or None."""
    n = len(y)
    shapes = f"model outputs {tuple(out.shape)}, targets {tuple(y.shape)} {y.dtype}"
    bad = None
    if kind == "classification":
        if out.ndim != 2 or y.ndim != 1:
            bad = "classification needs [n, classes] logits and one integer label per example"
        elif y.dtype == torch.bool or y.is_floating_point():
            bad = f"classification needs integer class labels, got dtype {y.dtype}"
        elif int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
            bad = (
                f"labels must lie in [0, {out.shape[1] - 1}] for this model's {out.shape[1]} "
                f"outputs; found labels in [{int(y.min())}, {int(y.max())}]"
            )
    elif kind == "binary":
        if out.reshape(n, -1).shape[1] != 1 or y.reshape(n, -1).shape[1] != 1:
            bad = "binary needs one logit per example ([n] or [n, 1]) and one 0/1 target"
        elif not _is01(y):
            bad = "binary needs 0/1 targets"
    elif kind == "regression":
        if not torch.is_floating_point(out):
            bad = "regression needs real-valued outputs"
        elif out.reshape(n, -1).shape[1] != y.reshape(n, -1).shape[1]:
            bad = "regression needs one output per target dimension ([n] or [n, D] both)"
        elif not y.is_floating_point() and not y.is_complex():
            return None  # integer targets are fine for squared error
    elif kind == "multilabel":
        if y.ndim != 2 or out.reshape(n, -1).shape != y.shape:
            bad = "multilabel needs [n, L] logits and [n, L] 0/1 targets"
        elif not _is01(y):
            bad = "multilabel needs 0/1 targets"
    elif kind == "sequence":
        if out.ndim != 3 or y.ndim != 2 or out.shape[:2] != y.shape:
            bad = "sequence needs [n, T, vocab] logits and [n, T] token labels"
        elif y.is_floating_point():
            bad = "sequence needs integer token labels"
        else:
            real = y[y != IGNORE_INDEX]
            if len(real) and (int(real.min()) < 0 or int(real.max()) >= out.shape[2]):
                bad = (
                    f"token labels must lie in [0, {out.shape[2] - 1}] or be {IGNORE_INDEX} "
                    f"(ignored); found [{int(real.min())}, {int(real.max())}]"
                )
    else:
        bad = f"unknown task kind {kind!r}"
    if bad is None:
        return None
    fit = suggest_kind(out, y)
    if fit is not None and fit != kind:
        width = out.reshape(n, -1).shape[1] if n else 0
        outs = f"{width} output{'s' if width != 1 else ''}"
        return (
            f"{bad} ({shapes}). The model has {outs} and {_target_words(y)}: set task.kind: {fit}"
        )
    return (
        f"{bad} ({shapes}); set task.kind to the kind the model was trained for, or give "
        "task.loss (your own per-example loss)"
    )


def prepare_queries(rt: Runtime, state: ModelState, qs: Examples) -> tuple[Inputs, torch.Tensor]:
    """Materialise queries (small) and, if configured, lift already-fit ones off zero loss."""
    xq, yq = qs.materialise()
    check_targets(rt, state, xq, yq, "queries")
    sph = rt.config.sphere
    if sph is None or not isinstance(xq, torch.Tensor) or not xq.is_floating_point():
        return xq, yq  # only a single float input can be perturbed
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
