"""Typed results: ``Scores`` (what a scorer returns), their scale, health and ``ScoreReport``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from mirrorinf.engine.config import ForwardInfConfig

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Scores of one call, float64 on the CPU, before the report.

    ``matrix`` is [n_train, n_columns] (one column per query; one for group and self); for
    pairwise it is the call's output (float32, written block by block by a :class:`ScoreWriter`,
    whose column statistics ``stats`` keeps, so the matrix is never read back or widened);
    ``query_self_drop`` each column's own loss drop (None for self-influence); ``lrs`` the step
    size(s) used; ``scale`` the unit of the scores (see ScoreReport).
    """

    matrix: torch.Tensor | ScoreSink
    query_self_drop: torch.Tensor | None
    scale: str
    path: str
    lrs: torch.Tensor
    steps: int
    lambda_max: float | None = None
    lambda_min: float | None = None
    stability: float | None = None
    upcast: int = 0
    stats: ColumnStats | None = None  # of ``matrix`` when it was written block by block
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
    safe = None if divisor is None else _safe(divisor).to(matrix.dtype)
    if safe is not None:
        matrix = matrix / (safe.reshape(-1, 1) if per_row else safe.reshape(1, -1))
    if config.score == "abs":
        matrix = matrix.abs()
    return matrix, rescale_drop(config, drop, safe)


def _safe(divisor: torch.Tensor) -> torch.Tensor:
    """A divisor with its zeros (no step taken) replaced by 1: those scores stay undivided."""
    return torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def rescale_drop(
    config: ForwardInfConfig, drop: torch.Tensor | None, safe: torch.Tensor | None
) -> torch.Tensor | None:
    """Each query's own loss drop on its column's scale (see :func:`rescale`)."""
    if drop is None:
        return None
    drop = drop * (1.0 if config.direction == "descent" else -1.0)
    if safe is not None:
        drop = drop / safe.reshape(-1)[: len(drop)]
    return drop.abs() if config.score == "abs" else drop


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


class ScoreSink(Protocol):
    """Where pairwise scores go: a [n_train, n_query] array (numpy array, ``np.memmap``, or
    any object with ``shape``, ``dtype`` and numpy-style slice assignment) that the engine fills
    one block of rows x columns at a time and never reads back."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __setitem__(self, key: Any, value: Any, /) -> None: ...


class Columns:
    """Some columns of a sink, as a sink of their own (the float64 redo of vanished columns
    writes its columns straight into the call's output)."""

    def __init__(self, out: ScoreSink, cols: torch.Tensor) -> None:
        self.out, self.cols = out, cols.numpy()
        self.shape, self.dtype = (out.shape[0], len(self.cols)), out.dtype

    def __setitem__(self, key: tuple[slice, slice], value: Any) -> None:
        rows, cols = key
        self.out[rows, self.cols[cols]] = value


class NonFiniteScores(FloatingPointError):
    """Scores with NaN/inf: which kind, and the first such cell (row of the scored set, column:
    the query for pairwise scores), so a caller can name the example."""

    def __init__(self, kind: str, cell: tuple[int, int] | None) -> None:
        self.kind, self.cell = kind, cell
        where = f" (first at row {cell[0]}, column {cell[1]})" if cell is not None else ""
        super().__init__(
            f"{kind} scores contain NaN/inf{where}: an example's loss or update overflows (inputs "
            "of extreme magnitude?) or the update diverged; use a smaller lr or fewer steps"
        )


@dataclass
class ColumnStats:
    """Per-column exact-zero counts, minimum and maximum of a [rows, columns] float64 score
    matrix seen block by block, and whether all were finite: the health checks and the
    vanished-column test without the matrix."""

    zeros: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    rows: int = 0
    finite: bool = True
    bad: tuple[int, int] | None = None  # the first non-finite cell (row, column)

    @classmethod
    def empty(cls, n_cols: int) -> ColumnStats:
        inf = torch.full((n_cols,), float("inf"), dtype=torch.float64)
        return cls(torch.zeros(n_cols, dtype=torch.int64), inf, -inf)

    @classmethod
    def scan(cls, matrix: Any, block_rows: int = 8192) -> ColumnStats:
        """The statistics of a whole tensor, array or memory map, read in row blocks (so a
        matrix on disk is never loaded or widened whole)."""
        n = len(matrix)
        shape = tuple(matrix.shape)
        stats = cls.empty(int(math.prod(shape[1:])) if len(shape) > 1 else 1)
        for start in range(0, n, block_rows):
            part = matrix[start : start + block_rows]  # a copy of a read-only map's block
            block = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))
            stats.update(block.reshape(len(block), -1), slice(0, stats.zeros.shape[0]), start)
        return stats

    def update(self, block: torch.Tensor, cols: slice, start: int) -> None:
        """Count a block of rows [start, start + len(block)) of columns ``cols``."""
        finite = torch.isfinite(block)
        if not bool(finite.all()):
            self.finite = False
            if self.bad is None:
                r, c = (~finite).nonzero()[0].tolist()
                self.bad = (start + r, (cols.start or 0) + c)
        self.zeros[cols] += (block == 0).sum(dim=0)
        if len(block):
            self.lo[cols] = torch.minimum(self.lo[cols], block.min(dim=0).values)
            self.hi[cols] = torch.maximum(self.hi[cols], block.max(dim=0).values)
        self.rows = max(self.rows, start + len(block))

    def replace(self, cols: torch.Tensor, other: ColumnStats) -> None:
        """Columns ``cols`` recomputed (their statistics are ``other``'s)."""
        self.zeros[cols], self.lo[cols], self.hi[cols] = other.zeros, other.lo, other.hi
        self.finite = self.finite and other.finite
        if self.bad is None and other.bad is not None:
            self.bad = (other.bad[0], int(cols[other.bad[1]]))

    def vanished(self) -> torch.Tensor:
        """Columns float precision could not resolve: over 1% exact zeros, or all values
        equal."""
        return (self.zeros.double() / max(1, self.rows) > 0.01) | (self.hi == self.lo)

    def health(self, kind: str) -> tuple[float, int]:
        """(fraction of exact zeros, number of constant columns); NaN/inf is a
        :class:`NonFiniteScores`."""
        if self.rows == 0:
            return float("nan"), 0
        if not self.finite:
            raise NonFiniteScores(kind, self.bad)
        cells = self.rows * self.zeros.shape[0]
        zero = int(self.zeros.sum()) / cells if cells else float("nan")
        const = int((self.lo == self.hi).sum()) if self.rows > 1 else 0
        if zero > 0.01 or const > 0:
            log.warning(
                "%s scores: %.1f%% exactly zero, %d query column(s) constant; "
                "the step may be too small for this precision (raise rel_step or lr)",
                kind,
                100 * zero,
                const,
            )
        return zero, const


class ScoreWriter:
    """Pairwise scores on their way out: blocks of raw float64 loss drops, rescaled as
    :func:`rescale` does (so the values are bit for bit the same), rounded to the sink's dtype
    and written into it, with their :class:`ColumnStats` kept (of the unrounded values)."""

    def __init__(
        self,
        config: ForwardInfConfig,
        out: ScoreSink,
        scale: str,
        steps: int,
        per_unit_lr: bool = False,
    ) -> None:
        n_cols = out.shape[1]
        self.config, self.out, self.scale, self.steps = config, out, scale, steps
        self.sign = 1.0 if config.direction == "descent" else -1.0
        self.safe = torch.ones(n_cols, dtype=torch.float64) if per_unit_lr else None
        self.stats = ColumnStats.empty(n_cols)
        self.dtype = np.dtype(out.dtype)

    @classmethod
    def plain(cls, config: ForwardInfConfig, out: ScoreSink) -> ScoreWriter:
        """The writer of a plain update's scores: per unit lr when the lr was automatic, else
        raw loss drops (as :func:`plain_scores`)."""
        auto = config.lr is None
        return cls(config, out, "per_unit_lr" if auto else "loss", config.steps or 1, auto)

    def divide(self, cols: slice, lrs: torch.Tensor) -> None:
        """The step sizes of columns ``cols`` (set before their blocks are put)."""
        if self.safe is not None:
            self.safe[cols] = _safe(lrs.cpu().to(torch.float64))

    def put(self, rows: slice, cols: slice, raw: torch.Tensor) -> None:
        """Raw loss drops [rows, cols] (float64) -> scaled, counted, written."""
        block = raw.cpu() * self.sign
        if self.safe is not None:
            block = block / self.safe[cols].reshape(1, -1)
        if self.config.score == "abs":
            block = block.abs()
        self.stats.update(block, cols, rows.start or 0)
        self.out[rows, cols] = block.numpy().astype(self.dtype, copy=False)

    def scores(self, drop: torch.Tensor, lrs: torch.Tensor, path: str) -> Scores:
        """The call's Scores: the sink as its matrix, the drops on the columns' scale."""
        drop_scaled = rescale_drop(self.config, drop, self.safe)
        return Scores(self.out, drop_scaled, self.scale, path, lrs, self.steps, stats=self.stats)


def in_memory(n_rows: int, n_cols: int, dtype: Any = np.float32) -> np.ndarray:
    """A sink in memory (what ``ForwardInf.pairwise`` returns, as a tensor)."""
    return np.empty((n_rows, n_cols), dtype=dtype)


def health(kind: str, matrix: Any, block_rows: int = 8192) -> tuple[float, int]:
    """(fraction of exact zeros, number of constant columns) of a [rows, columns] tensor, array
    or memory map, read in row blocks so a matrix on disk is never loaded or widened whole;
    NaN/inf is a FloatingPointError."""
    return ColumnStats.scan(matrix, block_rows).health(kind)


def make_report(kind: str, mode: str, scores: Scores, seconds: float) -> ScoreReport:
    """The report of a finished call (health checked here)."""
    stats = scores.stats if scores.stats is not None else ColumnStats.scan(scores.matrix)
    zero, const = stats.health(kind)
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
