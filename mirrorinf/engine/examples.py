"""Input handling for the engine: (x, y) tensors or a torch Dataset, validated and batched.

Validation happens here, once, so the engine's math never sees an empty set, mismatched lengths,
non-finite features or labels of the wrong kind; every problem is a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

DataLike = Any  # tuple (x, y) of tensors / arrays, or a torch Dataset yielding (x, y)


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{what} has dtype object; pass a numeric array")
        return torch.from_numpy(value)
    raise ValueError(f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}")


@dataclass
class Examples:
    """A validated set of examples that can be streamed in batches.

    Either ``x``/``y`` hold the whole set, or ``dataset`` is streamed through a DataLoader
    (memory stays flat in the number of examples).
    """

    name: str
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    dataset: Dataset[Any] | None = None
    n: int = 0
    key: tuple[object, ...] | None = (
        None  # identity of the caller's data (kept when moved to a device)
    )

    def __len__(self) -> int:
        return self.n

    def batches(
        self, size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (start, x_batch, y_batch) in order, moved to ``device``."""
        device = torch.device(device)
        pin = device.type == "cuda"
        if self.x is not None and self.y is not None:
            for start in range(0, self.n, size):
                xb, yb = self.x[start : start + size], self.y[start : start + size]
                if pin and xb.device.type == "cpu":
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                yield start, xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
            return
        assert self.dataset is not None
        loader = DataLoader(self.dataset, batch_size=size, shuffle=False, pin_memory=pin)
        start = 0
        for item in loader:
            xb, yb = _split_item(item, self.name)
            _check_finite(xb, f"{self.name} features (batch at row {start})")
            yield start, xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
            start += len(xb)

    def take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise a subset (used for small sets: queries, curvature subsamples)."""
        if self.x is not None and self.y is not None:
            return self.x[index], self.y[index]
        assert self.dataset is not None
        idx = range(self.n)[index] if isinstance(index, slice) else index.tolist()
        items = [self.dataset[i] for i in idx]
        xs = torch.stack([_to_tensor(it[0], f"{self.name} x") for it in items])
        ys = torch.stack([torch.as_tensor(it[1]) for it in items])
        return xs, ys

    def materialise(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(slice(0, self.n))


def _split_item(item: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{name}: the Dataset must yield (x, y) pairs")
    return _to_tensor(item[0], f"{name} x"), torch.as_tensor(item[1])


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).reshape(len(x), -1).any(dim=1).sum()) if x.ndim else 1
        raise ValueError(f"{what} contain NaN or inf in {bad} row(s); clean or impute them first")


def as_examples(data: DataLike, name: str) -> Examples:
    """Validate ``data`` ((x, y) or a Dataset yielding (x, y)) and wrap it for batching."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, Dataset) and not isinstance(data, (tuple, list)):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"{name}: the Dataset must define __len__") from exc
        if n == 0:
            raise ValueError(f"{name} is empty; pass at least one example")
        _split_item(data[0], name)
        return Examples(name=name, dataset=data, n=n)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            f"{name} must be a tuple (x, y) of tensors/arrays or a torch Dataset yielding (x, y), "
            f"got {type(data).__name__}"
        )
    x = _to_tensor(data[0], f"{name} x")
    y = _to_tensor(data[1], f"{name} y")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{name}: x and y need a leading example dimension")
    if len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x)} rows but y has {len(y)}; they must match")
    if len(x) == 0:
        raise ValueError(f"{name} is empty; pass at least one example")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} x has dtype {x.dtype}; pass real-valued features")
    _check_finite(x, f"{name} features")
    if y.is_floating_point():
        _check_finite(y, f"{name} targets")
    return Examples(name=name, x=x, y=y, n=len(x))
