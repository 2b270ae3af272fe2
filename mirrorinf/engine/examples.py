"""Input handling for the engine: (x, y) tensors, a torch Dataset or a row-range reader,
validated and batched.

A :class:`RowReader` (anything with ``__len__`` and ``read(start, stop) -> (x, y)``) is read one
training batch at a time, so a data set larger than memory streams: only the rows of the batch
in hand are ever held. The whole-tensor path stays for library users and small data.

Validation happens here, once, so the engine's math never sees an empty set, mismatched lengths,
non-finite features or labels of the wrong kind; every problem is a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


def aligned(x: Inputs) -> Inputs:
    """``x`` with every tensor in 64-byte aligned memory (a copy only of those that are not):
    CPU kernels round differently by alignment, so a batch must not depend on where its rows
    sat in a larger tensor, a mapped file or a reader's buffer for scores to be bit-identical
    across sources and batch sizes."""
    return each(x, lambda v: v.clone() if v.device.type == "cpu" and v.data_ptr() % 64 else v)


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


@runtime_checkable
class RowReader(Protocol):
    """Rows of a data set by range, read on demand: ``read(start, stop)`` gives validated
    (x, y) tensors of rows ``start:stop`` (CPU) without reading the others. A reader may also
    offer ``batches(size, start, stop)`` yielding (x, y) in order (e.g. decoding ahead in
    worker processes); without it every batch is one ``read``."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[Inputs, torch.Tensor]: ...


@dataclass
class Examples:
    """A validated set of examples that can be streamed in batches.

    Either ``x``/``y`` hold the whole set, or ``dataset`` is streamed through a DataLoader, or
    ``reader`` gives each batch's rows on demand (memory stays flat in the number of examples).
    """

    name: str
    x: Inputs | None = None
    y: torch.Tensor | None = None
    dataset: Dataset[Any] | None = None
    n: int = 0
    key: tuple[object, ...] | None = (
        None  # identity of the caller's data (kept when moved to a device)
    )
    reader: RowReader | None = None

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
                xb = aligned(rows(self.x, slice(start, start + size)))
                yb = self.y[start : start + size]
                if pin and yb.device.type == "cpu":
                    xb, yb = each(xb, lambda v: v.pin_memory()), yb.pin_memory()
                yield start, move(xb, device, pin), yb.to(device, non_blocking=pin)
            return
        if self.reader is not None:
            for start, xb, yb in read_batches(self.reader, size, 0, self.n):
                xb = aligned(xb)
                if pin:
                    xb, yb = each(xb, lambda v: v.pin_memory()), yb.pin_memory()
                yield start, move(xb, device, pin), yb.to(device, non_blocking=pin)
            return
        assert self.dataset is not None
        loader = DataLoader(self.dataset, batch_size=size, shuffle=False, pin_memory=pin)
        start = 0
        for item in loader:
            xb, yb = _split_item(item, self.name)
            xb = aligned(xb)
            _check_finite(xb, f"{self.name} features (batch at row {start})")
            yield start, move(xb, device, pin), yb.to(device, non_blocking=pin)
            start += len(yb)

    def take(self, index: torch.Tensor | slice, span: int = 1) -> tuple[Inputs, torch.Tensor]:
        """Materialise a subset (used for small sets: queries, curvature subsamples, folds);
        from a reader, ``span`` is :func:`gather`'s."""
        if self.x is not None and self.y is not None:
            return aligned(rows(self.x, index)), self.y[index]
        if self.reader is not None:
            xs, ys = gather(self.reader, index, self.n, span)
            return aligned(xs), ys
        assert self.dataset is not None
        idx = range(self.n)[index] if isinstance(index, slice) else index.tolist()
        items = [self.dataset[i] for i in idx]
        xs = stack([it[0] for it in items], f"{self.name} x")
        ys = torch.stack([torch.as_tensor(it[1]) for it in items])
        return xs, ys

    def copied_to(self, device: torch.device | str, batch: int) -> tuple[Inputs, torch.Tensor]:
        """Every row on ``device``, copied batch by batch (a streamed set is never whole on
        the host on its way to a GPU)."""
        got = list(self.batches(batch, device))
        return cat_inputs([xb for _, xb, _ in got]), torch.cat([yb for _, _, yb in got])

    def materialise(self) -> tuple[Inputs, torch.Tensor]:
        return self.take(slice(0, self.n))


def read_batches(
    reader: RowReader, size: int, start: int, stop: int
) -> Iterator[tuple[int, Inputs, torch.Tensor]]:
    """(start, x, y) of rows ``start:stop`` of ``reader`` in batches of ``size``, in order."""
    own = getattr(reader, "batches", None)
    if callable(own):
        at = start
        for xb, yb in own(size, start, stop):
            yield at, xb, yb
            at += len(yb)
        return
    for at in range(start, stop, size):
        xb, yb = reader.read(at, min(at + size, stop))
        yield at, xb, yb


def gather(
    reader: RowReader, index: torch.Tensor | slice, n: int, span: int = 1
) -> tuple[Inputs, torch.Tensor]:
    """Rows ``index`` (a slice, or positions in any order) of ``reader``: each run of
    consecutive positions is one read, so a sorted subset reads little; with ``span`` > 1, each
    read instead covers the positions less than ``span`` rows after its first one (a random
    subset is then a few reads of at most ``span`` rows, not one read per row)."""
    if isinstance(index, slice):
        start, stop, step = index.indices(n)
        if step == 1:
            return reader.read(start, max(start, stop))
        index = torch.arange(start, stop, step)
    idx = torch.as_tensor(index).reshape(-1).long()
    if len(idx) == 0:
        x0, y0 = reader.read(0, 0)
        return x0, y0
    order = torch.argsort(idx, stable=True)
    pos = idx[order].tolist()
    got_x: list[Inputs] = []
    got_y: list[torch.Tensor] = []
    lo = 0
    while lo < len(pos):
        hi = lo + 1
        while hi < len(pos) and (
            pos[hi] < pos[lo] + span if span > 1 else pos[hi] <= pos[hi - 1] + 1
        ):
            hi += 1
        first, last = pos[lo], pos[hi - 1]
        xb, yb = reader.read(first, last + 1)
        local = torch.tensor(pos[lo:hi]) - first
        got_x.append(rows(xb, local))
        got_y.append(yb[local])
        lo = hi
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    x_cat = cat_inputs(got_x)
    return rows(x_cat, inverse), torch.cat(got_y)[inverse]


def cat_inputs(xs: list[Inputs]) -> Inputs:
    """Inputs of several row blocks, concatenated along the rows."""
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}  # type: ignore[index]
    return torch.cat(xs)  # type: ignore[arg-type]


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


_FINITE_BLOCK = 1 << 24  # elements checked at once: the check's mask stays 16 MiB at any N


def _check_finite(x: Inputs, what: str) -> None:
    """Refuse NaN/inf features, checked in row blocks (a whole-tensor mask would be O(N))."""
    for v in parts(x):
        if not v.is_floating_point():
            continue
        if v.ndim == 0:
            bad = 0 if bool(torch.isfinite(v)) else 1
        else:
            step = max(1, _FINITE_BLOCK // max(1, v[:1].numel()))
            bad = 0
            for s in range(0, len(v), step):
                ok = torch.isfinite(v[s : s + step])
                if not bool(ok.all()):
                    bad += int((~ok).reshape(len(ok), -1).any(dim=1).sum())
        if bad:
            raise ValueError(
                f"{what} contain NaN or inf in {bad} row(s); clean or impute them first"
            )


def as_examples(data: DataLike, name: str) -> Examples:
    """Validate ``data`` ((x, y), a Dataset yielding (x, y), or a :class:`RowReader`, which
    validates its own rows) and wrap it for batching."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, RowReader) and not isinstance(data, (Dataset, tuple, list)):
        n = len(data)
        if n == 0:
            raise ValueError(f"{name} is empty; pass at least one example")
        return Examples(name=name, n=n, reader=data)
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
