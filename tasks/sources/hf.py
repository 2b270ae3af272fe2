"""A HuggingFace ``datasets`` folder written by ``save_to_disk`` (memory-mapped Arrow).

The columns come from params ``data.columns``: ``inputs`` (one column -> ``x``; several ->
named inputs ``x_<name>``, e.g. input_ids and attention_mask), ``label`` and an optional ``id``.
Numbers stay numbers (integers int64, floats float32 after validation); sequences must have
equal lengths (they become ``[n, T]`` arrays; nested sequences ``[n, T, ...]``). Rows are read
by range from the memory-mapped Arrow table, never all at once. ``datasets`` is imported only
when this format is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import Columns, Raw, file_md5

__all__ = ["HFFolder"]


def _datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{where}: reading a HuggingFace datasets folder needs the `datasets` package: "
            "pip install mirrorinf[hf]"
        ) from None
    return datasets


def _to_numpy(column: Any, where: str, name: str) -> np.ndarray:
    """An Arrow column as a numpy array; equal-length lists become extra axes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(arr)]
    while (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or (pa.types.is_fixed_size_list(arr.type))
    ):
        if arr.null_count:
            raise DataError(f"{where}: column {name!r} has {arr.null_count} missing value(s)")
        lengths = pc.list_value_length(arr)
        lo, hi = (pc.min(lengths).as_py(), pc.max(lengths).as_py()) if len(arr) else (0, 0)
        if lo != hi:
            raise DataError(
                f"{where}: column {name!r} holds sequences of different lengths ({lo} to {hi}); "
                "pad them to one length (e.g. the tokenizer's padding='max_length') and add an "
                "attention mask column"
            )
        shape.append(lo or 0)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)) and not (
        pa.types.is_boolean(arr.type) or pa.types.is_string(arr.type)
    ):
        raise DataError(
            f"{where}: column {name!r} has type {column.type}; only numbers, strings (ids) and "
            "equal-length sequences of numbers can be read: convert it, or use data.factory"
        )
    if arr.null_count:
        raise DataError(f"{where}: column {name!r} has {arr.null_count} missing value(s)")
    return np.asarray(arr.to_numpy(zero_copy_only=False)).reshape(shape)


class HFFolder:
    """A ``save_to_disk`` folder; ``rows(a, b)`` reads only those rows of the Arrow table."""

    def __init__(self, root: Path, columns: Columns, where: str) -> None:
        datasets = _datasets(where)
        self.root, self.columns, self.where = Path(root), columns, where
        self.classes: tuple[str, ...] | None = None
        try:
            ds = datasets.load_from_disk(str(self.root))
        except Exception as err:  # datasets raises several unrelated types for bad folders
            raise DataError(f"{where}: not a readable datasets folder: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{where}: a DatasetDict (splits: {', '.join(ds)}); point the path at one "
                "split's folder"
            )
        self.ds = ds.with_format("arrow")
        wanted = [*columns.inputs, columns.label, *([columns.id] if columns.id else [])]
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{where}: unknown column(s) {', '.join(map(repr, missing))} (columns: "
                f"{', '.join(ds.column_names)}); set data.columns.inputs / label / id"
            )
        if not columns.inputs:
            raise DataError(f"{where}: data.columns.inputs is empty; name the input column(s)")
        feature = ds.features.get(columns.label)
        names = getattr(feature, "names", None)  # a ClassLabel column names its classes
        self.classes = tuple(names) if names else None
        self.md5 = self._digest()

    def _digest(self) -> str:
        """md5 over the Arrow files' digests and state.json (what load_from_disk reads)."""
        h = hashlib.md5()
        files = [*sorted(self.root.glob("*.arrow")), self.root / "state.json"]
        for f in files:
            if f.is_file():
                h.update(f"{f.name}\0{file_md5(f)}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, start: int, stop: int) -> Raw:
        """Rows ``start:stop`` as numpy arrays."""
        table = self.ds[start:stop]
        cols = self.columns

        def get(name: str) -> np.ndarray:
            return _to_numpy(table.column(name), self.where, name)

        inputs = cols.inputs
        x = get(inputs[0]) if len(inputs) == 1 else {c: get(c) for c in inputs}
        return Raw(x=x, y=get(cols.label), ids=get(cols.id) if cols.id else None)
