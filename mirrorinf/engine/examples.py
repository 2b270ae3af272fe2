"""Input handling for the engine: (x, y) tensors or a torch Dataset, validated and batched.

Validation happens here, once, so the engine's math never sees an empty set, mismatched lengths,
non-finite features or labels of the wrong kind; every problem is a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

DataLike = Any  # tuple (x, y) of tensors / arrays, or a torch Dataset yielding (x, y)
# a model's input: one tensor, or several named tensors (passed as keyword arguments), each
# with the leading example axis; every helper below treats both alike
Inputs = torch.Tensor | dict[str, torch.Tensor]


def each(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to every named tensor."""
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return fn(x)


def parts(x: Inputs) -> list[torch.Tensor]:
    """The tensors of an input (one, or each named one)."""
    return list(x.values()) if isinstance(x, dict) else [x]


def rows(x: Inputs, index: Any) -> Inputs:
    """The examples ``index`` (a slice, index tensor or list) of an input."""
    return each(x, lambda v: v[index])


def n_rows(x: Inputs) -> int:
    """Number of examples of an input (never the number of named parts)."""
    return len(parts(x)[0])


def move(x: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """An input on ``device``."""
    return each(x, lambda v: v.to(device, non_blocking=non_blocking))


def describe(x: Inputs) -> str:
    """Shapes and dtypes of an input, for messages."""
    if isinstance(x, dict):
        return ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in x.items())
    return f"{tuple(x.shape)} {x.dtype}"


def stack(items: list[Any], what: str) -> Inputs:
    """Stack per-example inputs (tensors/arrays, or dicts of them) into one batch."""
    if items and isinstance(items[0], dict):
        return {
            k: torch.stack([_to_tensor(it[k], f"{what}[{k!r}]") for it in items]) for k in items[0]
        }
    return torch.stack([_to_tensor(it, what) for it in items])


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
    x: Inputs | None = None
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
    ) -> Iterator[tuple[int, Inputs, torch.Tensor]]:
        """Yield (start, x_batch, y_batch) in order, moved to ``device``."""
        device = torch.device(device)
        pin = device.type == "cuda"
        if self.x is not None and self.y is not None:
            for start in range(0, self.n, size):
                xb, yb = rows(self.x, slice(start, start + size)), self.y[start : start + size]
                if pin and yb.device.type == "cpu":
                    xb, yb = each(xb, lambda v: v.pin_memory()), yb.pin_memory()
                yield start, move(xb, device, pin), yb.to(device, non_blocking=pin)
            return
        assert self.dataset is not None
        loader = DataLoader(self.dataset, batch_size=size, shuffle=False, pin_memory=pin)
        start = 0
        for item in loader:
            xb, yb = _split_item(item, self.name)
            _check_finite(xb, f"{self.name} features (batch at row {start})")
            yield start, move(xb, device, pin), yb.to(device, non_blocking=pin)
            start += len(yb)

    def take(self, index: torch.Tensor | slice) -> tuple[Inputs, torch.Tensor]:
        """Materialise a subset (used for small sets: queries, curvature subsamples)."""
        if self.x is not None and self.y is not None:
            return rows(self.x, index), self.y[index]
        assert self.dataset is not None
        idx = range(self.n)[index] if isinstance(index, slice) else index.tolist()
        items = [self.dataset[i] for i in idx]
        xs = stack([it[0] for it in items], f"{self.name} x")
        ys = torch.stack([torch.as_tensor(it[1]) for it in items])
        return xs, ys

    def materialise(self) -> tuple[Inputs, torch.Tensor]:
        return self.take(slice(0, self.n))


def _split_item(item: Any, name: str) -> tuple[Inputs, torch.Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{name}: the Dataset must yield (x, y) pairs")
    return _as_inputs(item[0], f"{name} x"), torch.as_tensor(item[1])


def _as_inputs(value: Any, what: str) -> Inputs:
    """A tensor, or a dict of named tensors (several model inputs)."""
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{what} is an empty dict; pass at least one named input")
        out = {str(k): _to_tensor(v, f"{what}[{k!r}]") for k, v in value.items()}
        if len({len(v) if v.ndim else -1 for v in out.values()}) != 1:
            sizes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in out.items())
            raise ValueError(f"{what}: the named inputs differ in their number of rows ({sizes})")
        return out
    return _to_tensor(value, what)


def _check_finite(x: Inputs, what: str) -> None:
    for v in parts(x):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).reshape(len(v), -1).any(dim=1).sum()) if v.ndim else 1
            raise ValueError(
                f"{what} contain NaN or inf in {bad} row(s); clean or impute them first"
            )


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
    x = _as_inputs(data[0], f"{name} x")
    y = _to_tensor(data[1], f"{name} y")
    if any(v.ndim == 0 for v in parts(x)) or y.ndim == 0:
        raise ValueError(f"{name}: x and y need a leading example dimension")
    if n_rows(x) != len(y):
        raise ValueError(f"{name}: x has {n_rows(x)} rows but y has {len(y)}; they must match")
    if len(y) == 0:
        raise ValueError(f"{name} is empty; pass at least one example")
    for v in parts(x):
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} x has dtype {v.dtype}; pass real-valued features")
    _check_finite(x, f"{name} features")
    if y.is_floating_point():
        _check_finite(y, f"{name} targets")
    return Examples(name=name, x=x, y=y, n=len(y))
