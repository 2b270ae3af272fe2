"""Crash-safe file writes shared by every module that persists results."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "scratch_array", "write_parquet"]

PARQUET_GROUP_ROWS = 1 << 16  # rows per row group of write_parquet: ~4 MiB of Arrow each


def atomic_write(path: str | Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename: readers (and a rerun after a
    crash) see the old file or the new one, never half of one. ``write`` gets a binary handle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scratch_array(shape: int | tuple[int, ...], dtype: Any = "float64") -> Any:
    """A new zero-filled array in a memory-mapped temporary file that has no name (unlinked at
    creation: never seen by another run or process, gone with the array, even on kill -9): its
    pages are file-backed, which the kernel can write back and drop, not the process's own
    (anonymous) memory; for per-row columns that must outlive a step at any N."""
    import numpy as np

    with tempfile.TemporaryFile(prefix="mirrorinf-scratch-") as fh:  # the map keeps it open
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(fh, dtype=dtype, mode="w+", shape=shape)


def write_parquet(frame: Any, path: str | Path, group_rows: int = PARQUET_GROUP_ROWS) -> None:
    """``frame.to_parquet(path, index=False)`` one row group at a time, atomically: the same
    schema (pandas metadata included) and values, but each group is converted to Arrow on its
    own, so writing needs ~``group_rows`` rows of Arrow, not a copy of the whole table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(frame, preserve_index=False)

    def write(fh: Any) -> None:
        with pq.ParquetWriter(fh, schema, compression="snappy") as writer:
            for start in range(0, max(len(frame), 1), group_rows):
                part = frame.iloc[start : start + group_rows]
                table = pa.Table.from_pandas(part, schema=schema, preserve_index=False)
                writer.write_table(table)

    atomic_write(path, write)
