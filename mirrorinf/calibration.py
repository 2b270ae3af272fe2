"""Calibration scores: the same influence scores on a clean, held-out set.

The flag thresholds in :mod:`mirrorinf.summary` are conformal quantiles of these scores, so that
a clean training example is flagged at a known rate. Pure engine use: no tools, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mirrorinf.engine import DataLike, ForwardInf, as_examples
from mirrorinf.engine.examples import Examples, Inputs, rows

FOLDS = 5
READ_BLOCK = 4096  # rows of a streamed calibration set read at once to gather a fold's rows


@dataclass
class Calibration:
    """``self_influence`` [m] of the calibration set, and ``group_influence`` [m]: each
    example's group influence on the calibration set *without its own fold* (None when the set
    has fewer than 2 * FOLDS examples) — like a training example scored on a validation set,
    but never fitted. ``loss_after_fit`` [m]: each example's loss after that fit (what the
    harmful flag thresholds; None with ``group_influence`` or when the engine gave none)."""

    self_influence: np.ndarray
    group_influence: np.ndarray | None
    loss_after_fit: np.ndarray | None = None


def calibration_scores(
    fi: ForwardInf, calib: DataLike, *, seed: int = 0, folds: int = FOLDS
) -> Calibration:
    """Score a clean held-out set with ``fi`` exactly as the training set is scored. A set
    given as a row reader (a lazy split) is read by row range, never whole: self-influence
    streams it, each fold is gathered (a fifth of the set) and the rest streamed by its rows."""
    data = as_examples(calib, "calibration set")
    whole = data.materialise() if data.reader is None else None
    self_inf = fi.self_influence(whole if whole is not None else data).double().numpy()
    n = len(data)
    if n < 2 * folds:
        return Calibration(self_inf, None)
    out, after = np.empty(n), np.empty(n)
    for fold in np.array_split(np.random.default_rng(seed).permutation(n), folds):
        rest = torch.from_numpy(np.setdiff1d(np.arange(n), fold))
        idx = torch.from_numpy(fold)
        if whole is not None:
            x, y = whole
            fit, evaluate = (rows(x, idx), y[idx]), (rows(x, rest), y[rest])
        else:
            fit, evaluate = data.take(idx, span=READ_BLOCK), _Subset(data, rest)
        out[fold] = fi.group(fit, evaluate).double().numpy()
        loss = fi.last_report.loss_after_fit if fi.last_report is not None else None
        after[fold] = np.nan if loss is None else loss.double().numpy()
    return Calibration(self_inf, out, None if np.isnan(after).all() else after)


class _Subset:
    """Rows ``index`` (sorted positions) of a streamed set as a row reader: each read gathers
    only its own rows (consecutive positions in one read)."""

    def __init__(self, data: Examples, index: torch.Tensor) -> None:
        self.data, self.index = data, index

    def __len__(self) -> int:
        return len(self.index)

    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
        """Rows ``start:stop`` of the subset."""
        return self.data.take(self.index[start:stop], span=READ_BLOCK)
