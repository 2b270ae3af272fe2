"""Single-file sources read by row range: an .npz whose arrays are memory-mapped where they are
stored uncompressed, and a .parquet file read by row groups.

Neither reads the whole file into memory: an uncompressed .npz member is a plain .npy inside
the zip, so its rows are mapped from the file at the member's data offset (``np.load``'s
``mmap_mode`` does not work inside an .npz); a compressed member cannot be mapped and is loaded
whole (logged). Both remember the file's size, mtime and inode when opened and refuse to read
rows once the file changed, so scores never come from bytes other than those digested.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import Raw, RawX

__all__ = ["NpzRows", "ParquetRows", "file_stamp", "npz_inputs"]

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local file header (30 bytes)


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """(size, mtime, ctime in ns, inode): what changes when a file is rewritten or edited in
    place (ctime too, which no one can set back: an edit that restores the mtime shows)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class _Stamped:
    """A file source that refuses to read once its file changed since it was opened."""

    path: Path
    where: str
    stamp: tuple[int, int, int, int]
    md5: str = ""  # of the whole file, set by the loader (in 1 MiB blocks)

    def check(self) -> None:
        """DataError when the file is not the one opened (edited, replaced or removed)."""
        try:
            now = file_stamp(self.path)
        except OSError as err:
            raise DataError(f"{self.where}: cannot read data file {self.path}: {err}") from None
        if now != self.stamp:
            raise DataError(
                f"{self.where}: {self.path} changed while it was being read (size, mtime or "
                "ctime differ from when it was opened and digested); run again on a stable file"
            )


def _member_map(path: Path, fh: Any, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """The .npy member ``info`` of a stored (uncompressed) zip as a copy-on-write memory map,
    after checking its .npy header (dtype, shape) against the member's size."""
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(head)
    if fields[0] != b"PK\x03\x04":
        raise DataError(f"{where}: corrupt .npz file: bad zip header of {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    fh.seek(start)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as err:
        raise DataError(f"{where}: corrupt .npz member {info.filename}: {err}") from None
    if dtype.hasobject:
        raise DataError(
            f"{where}: .npz member {info.filename} holds Python objects (pickles), which "
            "mirrorinf does not load; save numeric arrays"
        )
    offset = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes != info.file_size:
        raise DataError(
            f"{where}: corrupt .npz member {info.filename}: header says {dtype} {shape} "
            f"({nbytes} bytes) but the member holds {info.file_size - (offset - start)}"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype, order="F" if fortran else "C")
    return np.memmap(
        path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def npz_inputs(names: set[str], where: str) -> list[str]:
    """The named inputs (``x_<name>`` arrays, by name) of an .npz holding arrays ``names``
    ([] when the input is ``x``); DataError when ``x`` or ``y`` is missing, or both forms."""
    named = sorted(n for n in names if n.startswith("x_") and len(n) > 2)
    if "x" in names and named:
        raise DataError(
            f"{where}: .npz has both x and named inputs ({', '.join(named)}); keep x "
            "for one input or x_<name> arrays for several"
        )
    missing = {"y"} - names if named else {"x", "y"} - names
    if missing:
        raise DataError(
            f"{where}: .npz is missing array(s) {', '.join(sorted(missing))} "
            f"(has: {', '.join(sorted(names)) or 'none'}; inputs are x, or x_<name> "
            "for several named ones)"
        )
    return [n[2:] for n in named]


class NpzRows(_Stamped):
    """An .npz (``x`` or ``x_<name>``, ``y``, optional ``ids``) readable by row range; stored
    members are memory-mapped, compressed ones loaded whole (with a logged note)."""

    classes: tuple[str, ...] | None = None

    def __init__(self, path: Path, where: str) -> None:
        self.path, self.where = Path(path), where
        self.stamp = file_stamp(self.path)
        self.arrays = self._open()
        self.named = npz_inputs(set(self.arrays), where)
        self._check_lengths()

    def _open(self) -> dict[str, np.ndarray]:
        try:
            with open(self.path, "rb") as fh, zipfile.ZipFile(fh) as zf:
                members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
                arrays = {
                    i.filename[:-4]: _member_map(self.path, fh, i, self.where)
                    for i in members
                    if i.compress_type == zipfile.ZIP_STORED
                }
                packed = [i.filename[:-4] for i in members if i.filename[:-4] not in arrays]
        except DataError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as err:
            raise DataError(f"{self.where}: corrupt or unreadable .npz file: {err}") from None
        if packed:
            log.info(
                "%s: .npz member(s) %s are compressed and cannot be memory-mapped: loaded whole "
                "(save with np.savez, not savez_compressed, to stream them)",
                self.where,
                ", ".join(packed),
            )
            try:
                with np.load(self.path, allow_pickle=False) as npz:
                    arrays.update({n: npz[n] for n in packed})
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
                raise DataError(f"{self.where}: corrupt or unreadable .npz file: {err}") from None
        return arrays

    def _check_lengths(self) -> None:
        """Every array has one row per example (the messages of a whole load)."""
        xs = {k: self.arrays[f"x_{k}"] for k in self.named} or {"x": self.arrays["x"]}
        if any(v.ndim == 0 for v in xs.values()):
            return  # the row validation names it (x must be [n, ...])
        sizes = {k: len(v) for k, v in xs.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(
                f"{self.where}: the named inputs differ in their number of rows: {sizes}"
            )
        n, y = next(iter(sizes.values())), self.arrays["y"]
        if y.ndim == 0 or len(y) != n:
            raise DataError(f"{self.where}: y must be one label per row of x ({n}), got {y.shape}")
        ids = self.arrays.get("ids")
        if ids is not None and (ids.ndim != 1 or len(ids) != n):
            raise DataError(f"{self.where}: ids must be one per row ({n}), got shape {ids.shape}")

    def __len__(self) -> int:
        return len(self.arrays["y"])

    @property
    def file_backed(self) -> bool:
        """Whether every array is mapped from the file (nothing was loaded whole)."""
        return all(isinstance(a, np.memmap) or a.size == 0 for a in self.arrays.values())

    def release(self) -> None:
        """Drop the mapped pages already read from this process's resident memory (they are
        read again from the file, or the page cache, when touched): a pass over the rows keeps
        the resident set at about one batch. Nothing is written through these maps."""
        for a in self.arrays.values():
            mm = getattr(a, "_mmap", None)
            if isinstance(a, np.memmap) and mm is not None and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED)

    def rows(self, start: int, stop: int) -> Raw:
        """Rows ``start:stop`` (views of the mapped file)."""
        self.check()
        a = self.arrays
        x: RawX
        if self.named:
            x = {k: a[f"x_{k}"][start:stop] for k in self.named}
        else:
            x = a["x"][start:stop] if a["x"].ndim else a["x"]
        ids = a["ids"][start:stop] if "ids" in a else None
        return Raw(x=x, y=a["y"][start:stop], ids=ids)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("path", "where", "stamp", "md5")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Reopened from the file (a worker process maps it itself; nothing is pickled)."""
        self.__dict__.update(state)
        self.check()
        self.arrays = self._open()
        self.named = sorted(n[2:] for n in self.arrays if n.startswith("x_") and len(n) > 2)


class ParquetRows(_Stamped):
    """A .parquet file (numeric feature columns, a label column, optional ``id``) read by row
    groups: ``rows(a, b)`` reads only the row groups that hold rows ``a:b``."""

    classes: tuple[str, ...] | None = None

    def __init__(self, path: Path, where: str, label_column: str) -> None:
        self.path, self.where, self.label = Path(path), where, label_column
        self.stamp = file_stamp(self.path)
        self._open()

    def _open(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(self.path)
            schema = self.file.schema_arrow
        except Exception as err:  # pyarrow raises several unrelated types for bad files
            raise DataError(f"{self.where}: corrupt or unreadable parquet file: {err}") from None
        names = [n for n in schema.names if n != "__index_level_0__"]
        if self.label not in names:
            raise DataError(
                f"{self.where}: label column {self.label!r} not found "
                f"(columns: {', '.join(names)}); set data.label_column"
            )
        self.has_id = "id" in names
        self.features = [n for n in names if n not in (self.label, "id")]

        def numeric(t: Any) -> bool:
            return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))

        bad = [n for n in self.features if not numeric(schema.field(n).type)]
        if bad:
            raise DataError(f"{self.where}: non-numeric feature column(s): {', '.join(bad)}")
        if not self.features:
            raise DataError(f"{self.where}: no feature columns besides the label")
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, start: int, stop: int) -> Raw:
        """Rows ``start:stop``, reading only the row groups that hold them."""
        self.check()
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            start = stop = min(start, len(self))
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, max(start, stop - 1), side="right")) - 1
        groups = list(range(max(first, 0), max(last, first) + 1)) if len(self) else []
        cols = [*self.features, self.label, *(["id"] if self.has_id else [])]
        try:
            table = self.file.read_row_groups(groups, columns=cols) if groups else None
        except Exception as err:
            raise DataError(f"{self.where}: corrupt or unreadable parquet file: {err}") from None
        if table is None:
            table = self.file.schema_arrow.empty_table().select(cols)
        else:
            table = table.slice(start - int(self.offsets[first]), stop - start)

        def col(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy())

        x = np.empty((table.num_rows, len(self.features)), dtype=np.float32)
        for j, name in enumerate(self.features):
            x[:, j] = col(name)
        return Raw(x=x, y=col(self.label), ids=col("id") if self.has_id else None)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("path", "where", "label", "stamp", "md5")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Reopened from the file in a worker process."""
        self.__dict__.update(state)
        self.check()
        self._open()
