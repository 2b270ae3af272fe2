"""Typed results: ``Scores`` (what a scorer returns), their scale, health and ``ScoreReport``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mirrorinf.engine.config import ForwardInfConfig

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Scores of one call, float64 on the CPU, before the report.

    ``matrix`` is [n_train, n_columns] (one column per query; one for group and self);
    ``query_self_drop`` each column's own loss drop (None for self-influence); ``lrs`` the step
    size(s) used; ``scale`` the unit of the scores (see ScoreReport).
    """

    matrix: torch.Tensor
    query_self_drop: torch.Tensor | None
    scale: str
    path: str
    lrs: torch.Tensor
    steps: int
    lambda_max: float | None = None
    lambda_min: float | None = None
    stability: float | None = None
    upcast: int = 0
    loss_after: torch.Tensor | None = None  # group fit: [n_train] each row's loss after it


@dataclass
class ScoreReport:
    """What the last call computed and how healthy its scores are (saved beside results)."""

    kind: str
    mode: str
    n_train: int
    n_query: int
    scale: str  # "per_unit_lr": loss drop / lr (lr chosen automatically); "loss": raw drop
    steps: int
    path: str  # lowrank | generic | anchored
    lr_min: float
    lr_max: float
    zero_fraction: float
    n_constant_queries: int
    seconds: float
    lambda_max: float | None = None
    lambda_min: float | None = None
    stability: float | None = None
    upcast: int = 0  # queries (pairwise) or rows (self) recomputed in float64
    query_self_drop: torch.Tensor | None = field(default=None, repr=False)
    # group: each training row's loss under the fitted parameters (float64; not in to_dict)
    loss_after_fit: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        skip = ("query_self_drop", "loss_after_fit")
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        if self.query_self_drop is not None:
            out["query_self_drop"] = [float(v) for v in self.query_self_drop]
        return out


def rescale(
    config: ForwardInfConfig,
    matrix: torch.Tensor,
    drop: torch.Tensor | None,
    divisor: torch.Tensor | None,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip for ascent (positive = proponent), divide by ``divisor`` (per column, or per row
    with ``per_row``; zeros are left undivided), and take |.| if ``config.score`` asks."""
    sign = 1.0 if config.direction == "descent" else -1.0
    matrix = matrix * sign
    drop = None if drop is None else drop * sign
    if divisor is not None:
        safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor)).to(matrix.dtype)
        matrix = matrix / (safe.reshape(-1, 1) if per_row else safe.reshape(1, -1))
        if drop is not None:
            drop = drop / safe.reshape(-1)[: len(drop)]
    if config.score == "abs":
        matrix = matrix.abs()
        drop = None if drop is None else drop.abs()
    return matrix, drop


def plain_scores(
    config: ForwardInfConfig,
    matrix: torch.Tensor,
    drop: torch.Tensor | None,
    lrs: torch.Tensor,
    path: str,
    per_row: bool = False,
) -> Scores:
    """Scores of a plain update: per unit lr when the lr was automatic, else raw loss drops."""
    auto = config.lr is None
    matrix, drop = rescale(config, matrix, drop, lrs if auto else None, per_row)
    scale = "per_unit_lr" if auto else "loss"
    return Scores(matrix, drop, scale, path, lrs, config.steps or 1)


def vanished_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Columns float precision could not resolve: over 1% exact zeros, or all values equal."""
    zero = (matrix == 0).double().mean(dim=0) > 0.01
    return zero | (matrix.max(dim=0).values == matrix.min(dim=0).values)


def health(kind: str, matrix: Any, block_rows: int = 8192) -> tuple[float, int]:
    """(fraction of exact zeros, number of constant columns) of a [rows, columns] tensor, array
    or memory map, read in row blocks so a matrix on disk is never loaded or widened whole;
    NaN/inf is a FloatingPointError."""
    n = len(matrix)
    if n == 0:
        return float("nan"), 0
    zeros, cells = 0, 0
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    for start in range(0, n, block_rows):
        part = matrix[start : start + block_rows]  # a copy of a read-only map's block
        block = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))
        block = block.reshape(len(block), -1)
        if not bool(torch.isfinite(block).all()):
            raise FloatingPointError(
                f"{kind} scores contain NaN/inf: the update diverged; use a smaller lr or "
                "fewer steps"
            )
        zeros += int((block == 0).sum())
        cells += block.numel()
        b_lo, b_hi = block.min(dim=0).values, block.max(dim=0).values
        lo = b_lo if lo is None else torch.minimum(lo, b_lo)
        hi = b_hi if hi is None else torch.maximum(hi, b_hi)
    zero = zeros / cells if cells else float("nan")
    const = int((lo == hi).sum()) if n > 1 and lo is not None and hi is not None else 0
    if zero > 0.01 or const > 0:
        log.warning(
            "%s scores: %.1f%% exactly zero, %d query column(s) constant; "
            "the step may be too small for this precision (raise rel_step or lr)",
            kind,
            100 * zero,
            const,
        )
    return zero, const


def make_report(kind: str, mode: str, scores: Scores, seconds: float) -> ScoreReport:
    """The report of a finished call (health checked here)."""
    zero, const = health(kind, scores.matrix)
    drop = scores.query_self_drop
    return ScoreReport(
        kind=kind,
        mode=mode,
        n_train=scores.matrix.shape[0],
        n_query=scores.matrix.shape[1],
        scale=scores.scale,
        steps=scores.steps,
        path=scores.path,
        lr_min=float(scores.lrs.min()),
        lr_max=float(scores.lrs.max()),
        zero_fraction=zero,
        n_constant_queries=const,
        seconds=seconds,
        lambda_max=scores.lambda_max,
        lambda_min=scores.lambda_min,
        stability=scores.stability,
        upcast=scores.upcast,
        query_self_drop=None if drop is None else drop.float(),
        loss_after_fit=None if scores.loss_after is None else scores.loss_after.double().cpu(),
    )
