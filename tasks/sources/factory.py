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

    @property
    def md5(self) -> str:
        """Digest of the function's name and source and of every row it gives (reads all)."""
        if self._md5 is None:
            self._md5 = self._digest(self.rows(0, len(self)))
        return self._md5

    def _digest(self, raw: Raw) -> str:
        """md5 of the function's name and source and of all rows ``raw``."""
        h = hashlib.md5(self.code.encode())
        parts = raw.x if isinstance(raw.x, dict) else {"": raw.x}
        for key in sorted(parts):
            h.update(key.encode() + np.ascontiguousarray(parts[key]).tobytes())
        h.update(np.ascontiguousarray(raw.y).tobytes())
        if raw.ids is not None:
            h.update(np.asarray(raw.ids).astype(str).tobytes())
        return h.hexdigest()

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
        if start == 0 and len(items) == self.n and self._md5 is None:  # read whole: digest now
            self._md5 = self._digest(raw)
        return raw
