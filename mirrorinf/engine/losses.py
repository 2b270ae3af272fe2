"""Per-example losses of every task kind, and the float64 evaluation rule.

Each built-in loss returns one value per example and keeps full *relative* precision where a
confident, correct prediction would otherwise round to exactly zero (a loss of 1e-20, not 0), so
loss *differences* of well-fit examples do not vanish. They are evaluated in float64
(:func:`float64_losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TaskKind = Literal["classification", "binary", "regression", "multilabel", "sequence"]
KINDS: tuple[str, ...] = get_args(TaskKind)
IGNORE_INDEX = -100  # sequence labels with this value are not scored (PyTorch/HF convention)


def softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(t)), exact to full relative precision for very negative t (no 0 underflow
    before exp does) and without overflow for large t."""
    return t.clamp_min(0) + torch.log1p(torch.exp(-t.abs()))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy for integer class labels (the default loss).

    Computed as softplus(logsumexp_{k != y}(x_k - x_y)), which equals the usual formula but keeps
    full relative precision for well-fit examples (loss ~1e-20 instead of an exact 0), so loss
    *differences* of confident predictions do not vanish.
    """
    t = targets.long().unsqueeze(1)
    z = (outputs - outputs.gather(1, t)).scatter(1, t, float("-inf"))
    lse = torch.logsumexp(z, dim=1)
    return lse.clamp_min(0) + torch.log1p(torch.exp(-lse.abs()))


def _logit_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise BCE-with-logits, y * softplus(-z) + (1 - y) * softplus(z): for a 0/1 target
    one term is exactly 0 and the other keeps its precision at confident predictions."""
    y = y.to(z.dtype)
    return y * softplus(-z) + (1 - y) * softplus(z)


def binary_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example BCE-with-logits of one logit per example ([n] or [n, 1]) and 0/1 targets."""
    n = len(targets)
    return _logit_bce(outputs.reshape(n), targets.reshape(n))


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example squared error summed over output dimensions (targets [n] or [n, D]).

    The scale (sum, no 1/2) does not change influence rankings: steps are normalised."""
    n = len(targets)
    diff = outputs.reshape(n, -1) - targets.reshape(n, -1).to(outputs.dtype)
    return diff.pow(2).sum(dim=1)


def multilabel_bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example BCE-with-logits summed over labels ([n, L] logits and 0/1 targets)."""
    n = len(targets)
    return _logit_bce(outputs.reshape(n, -1), targets.reshape(n, -1)).sum(dim=1)


def sequence_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example mean token cross-entropy: logits [n, T, V], labels [n, T]; positions whose
    label is IGNORE_INDEX (-100) are left out (an example with none scores 0).

    Labels are taken position by position: for causal language modelling pass labels already
    shifted (``labels[:, t] = input_ids[:, t + 1]``, the last position -100), as the model's
    logits at position t predict the next token."""
    n, t = targets.shape[0], targets.shape[1]
    keep = targets != IGNORE_INDEX
    flat = cross_entropy(outputs.reshape(n * t, -1), torch.where(keep, targets, 0).reshape(-1))
    per_tok = torch.where(keep.reshape(-1), flat, torch.zeros_like(flat)).reshape(n, t)
    return per_tok.sum(dim=1) / keep.sum(dim=1).clamp_min(1).to(per_tok.dtype)


DEFAULT_LOSSES: dict[str, LossFn] = {
    "classification": cross_entropy,
    "binary": binary_cross_entropy,
    "regression": squared_error,
    "multilabel": multilabel_bce,
    "sequence": sequence_cross_entropy,
}


def default_loss(kind: str) -> LossFn:
    """The built-in per-example loss of a task kind."""
    if kind not in DEFAULT_LOSSES:
        raise ValueError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
    return DEFAULT_LOSSES[kind]


def float64_losses(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example losses in float64 (outputs cast up first, so differences keep precision)."""
    if out.is_floating_point():
        out = out.double()
    if y.is_floating_point():
        y = y.double()
    return loss_fn(out, y)
