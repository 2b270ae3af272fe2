"""``data.factory: "package.module:function"``: the user's function returns a map-style torch
Dataset for a split (``factory("train")``), for data no built-in reader fits.

Items are ``(x, y)``, ``(x, y, id)`` or dicts with keys ``x``, ``y`` and optional ``id``; ``x``
may be a dict of tensors (named inputs). This imports and runs the user's own code (that is the
point). Provenance digests the function's name, its module's source and the rows it gave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import Raw
from mirrorinf.usercode import load_callable, source_digest

__all__ = ["FactorySource"]


def _array(value: Any, where: str, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise DataError(f"{where}: {what} is not an array: {err}") from None
    if arr.dtype.kind not in "fiubUS":
        raise DataError(f"{where}: {what} is not numeric (got {type(value).__name__})")
    return arr


class FactorySource:
    """The Dataset ``spec(split)`` returns; ``rows(a, b)`` reads items a..b-1 only."""

    def __init__(self, spec: str, split: str, where: str) -> None:
        self.where, self.classes = where, None
        fn = load_callable(spec, "data.factory")
        try:
            self.ds = fn(split)
        except Exception as err:  # the user's code failed: say where, keep its message
            raise DataError(f"{where}: data.factory {spec}({split!r}) failed: {err!r}") from None
        if not (hasattr(self.ds, "__len__") and hasattr(self.ds, "__getitem__")):
            raise DataError(
                f"{where}: data.factory {spec}({split!r}) returned {type(self.ds).__name__}, not "
                "a map-style Dataset (with __len__ and __getitem__)"
            )
        self.n = len(self.ds)
        self.code = f"{spec}\0{source_digest(fn)}"
        self._md5: str | None = None
        self._hashers: dict[str, Any] = {}
        self._next = 0  # rows read in order from 0 so far: they feed the digest

    @property
    def md5(self) -> str:
        """Digest of the function's name and source and of every row it gives (rows not yet
        read in order are read now)."""
        if self._md5 is None:
            block = 1024
            for start in range(self._next, len(self), block):
                self.rows(start, min(start + block, len(self)))
        assert self._md5 is not None
        return self._md5

    def _absorb(self, raw: Raw) -> None:
        """Feed rows read in order into the digest (one md5 per part: x parts, y, ids)."""
        parts = raw.x if isinstance(raw.x, dict) else {"": raw.x}
        named = {f"x:{k}": np.ascontiguousarray(v).tobytes() for k, v in parts.items()}
        named["y"] = np.ascontiguousarray(raw.y).tobytes()
        if raw.ids is not None:
            named["ids"] = np.asarray(raw.ids).astype(str).tobytes()
        for key, blob in named.items():
            self._hashers.setdefault(key, hashlib.md5()).update(blob)
        self._next += len(raw.y)
        if self._next == self.n:
            h = hashlib.md5(self.code.encode())
            for key in sorted(self._hashers):
                h.update(f"{key}\0{self._hashers[key].hexdigest()}\n".encode())
            self._md5 = h.hexdigest()

    def __len__(self) -> int:
        return self.n

    def _item(self, i: int) -> tuple[Any, Any, Any]:
        try:
            item = self.ds[i]
        except Exception as err:
            raise DataError(f"{self.where}: data.factory item {i} failed: {err!r}") from None
        if isinstance(item, Mapping) and "x" in item and "y" in item:
            return item["x"], item["y"], item.get("id")
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            return item[0], item[1], item[2] if len(item) == 3 else None
        raise DataError(
            f"{self.where}: data.factory item {i} is {type(item).__name__}; return (x, y), "
            "(x, y, id) or a dict with keys x, y and optional id"
        )

    def rows(self, start: int, stop: int) -> Raw:
        """Items ``start:stop`` stacked into arrays (x, y, ids)."""
        idx = range(*slice(start, stop).indices(len(self)))
        items = [self._item(i) for i in idx]
        if not items:
            raise DataError(f"{self.where}: data.factory returned an empty Dataset")
        named = isinstance(items[0][0], Mapping)
        has_id = items[0][2] is not None
        if any(isinstance(x, Mapping) != named or (i is not None) != has_id for x, _, i in items):
            raise DataError(f"{self.where}: data.factory items differ in form (x or id)")

        def stack(values: list[Any], what: str) -> np.ndarray:
            arrays = [_array(v, self.where, what) for v in values]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise DataError(
                    f"{self.where}: data.factory {what} differ in shape ({sorted(shapes)[:3]}); "
                    "pad or resize them to one shape"
                )
            return np.stack(arrays)

        if named:
            keys = sorted(items[0][0])
            x: Any = {k: stack([it[0][k] for it in items], f"x[{k!r}]") for k in keys}
        else:
            x = stack([it[0] for it in items], "x")
        y = stack([it[1] for it in items], "y")
        if has_id:
            ids = np.asarray([i.item() if isinstance(i, torch.Tensor) else i for *_, i in items])
        else:  # positions, as for files without ids
            ids = np.arange(start, start + len(items), dtype=np.int64)
        raw = Raw(x=x, y=y, ids=ids)
        if start == self._next and self._md5 is None:
            self._absorb(raw)
        return raw
