"""Datasets from a local file or folder, a DVC repository at a revision (one tool: DVC), or
the user's Dataset factory.

Sources (params ``data.format``, ``auto`` by default; readers in :mod:`mirrorinf.tasks.sources`):
an image folder ``root/<class>/*.png|jpg|jpeg``, a HuggingFace ``datasets`` folder written by
``save_to_disk``, ``data.factory`` returning a torch Dataset, or a single file: ``.npz`` with
arrays ``x`` (or several named inputs ``x_<name>``, which the model receives as keyword
arguments), ``y`` and optional ``ids``, or ``.parquet`` with numeric feature columns, a label
column (named in params) and an optional ``id`` column. Float inputs are read as float32,
integer inputs stay integer (int64: token ids, embeddings). Targets follow the task kind:
integer labels (classification, binary, sequence) or float (regression, multilabel).
Loading returns tensors plus :class:`Provenance` (source, path, repo, rev, resolved commit,
format, class names, and the md5 of the exact bytes read; for folders a digest over every
file's path and md5), which keys caches and is logged with every result.
Everything wrong with the input is a :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf.engine import Inputs
from mirrorinf.engine.examples import aligned as _aligned_inputs
from mirrorinf.engine.examples import each, gather, rows
from mirrorinf.errors import DataError, InputError
from mirrorinf.io import atomic_write
from mirrorinf.tasks.sources import Raw, RawX, RowSource, detect_format, file_md5
from mirrorinf.tasks.sources.arrays import NpzRows, ParquetRows
from mirrorinf.tasks.sources.files import (
    dvc_opened,
    fmt_of,
    parse_npz,
    parse_parquet,
    read_dvc,
    read_local,
)
from mirrorinf.tasks.sources.readers import open_rows

__all__ = [
    "DataError",
    "Provenance",
    "Split",
    "check_labels",
    "ensure_writable",
    "load_dataset",
    "load_dataset_task",
    "prepare_demo",
    "prepare_demo_task",
    "read_json",
    "retry_unless_input_error",
    "write_json",
    "write_npy",
    "write_npz",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """Where a dataset's bytes came from; ``md5`` is of the exact bytes read."""

    source: str  # "file" or "dvc"
    path: str
    md5: str
    repo: str | None = None
    rev: str | None = None  # requested git revision (None = workspace)
    commit: str | None = None  # resolved git commit (dvc only)
    format: str | None = None  # npz, parquet, images, hf, factory
    classes: tuple[str, ...] | None = None  # class names by label index (image folders)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Split:
    """One loaded split (train, val or query): inputs (a tensor, or named tensors), targets,
    ids and provenance.

    A split read from a local file, folder or factory is lazy: ``reader`` gives any row range
    (validated) and the engine reads it batch by batch (:meth:`examples`); targets and ids are
    held in memory (validated in one streaming pass at load). ``x`` is the whole input, read on
    first use (for consumers that need every row at once; an uncompressed .npz of float32 or
    int64 arrays maps it from the file without copying).
    """

    def __init__(
        self,
        name: str,
        x: Inputs | None,
        y: torch.Tensor,
        ids: np.ndarray,
        provenance: Provenance,
        classes: tuple[str, ...] | None = None,
        reader: SplitReader | None = None,
    ) -> None:
        if x is None and reader is None:
            raise ValueError("a Split needs its inputs x or a reader")
        self.name, self._x, self.y, self.ids = name, x, y, ids
        self.provenance, self.classes, self.reader = provenance, classes, reader

    @property
    def x(self) -> Inputs:
        """The whole input (read from the source on first use when the split is lazy)."""
        if self._x is None:
            assert self.reader is not None
            logger.info("%s: reading all %d rows of the inputs at once", self.name, len(self))
            self._x = self.reader.read(0, len(self), aligned=False)[0]
        return self._x

    def __len__(self) -> int:
        return len(self.y)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a worker process without the inputs it can read itself."""
        state = dict(self.__dict__)
        if self.reader is not None:
            state["_x"] = None
        return state

    def pair(self) -> tuple[Inputs, torch.Tensor]:
        """(x, y) as the engine takes it."""
        return self.x, self.y

    def examples(self, start: int = 0, stop: int | None = None) -> Any:
        """Rows ``start:stop`` for the engine: the lazy reader (read batch by batch) or the
        (x, y) tensors."""
        stop = len(self) if stop is None else stop
        if self.reader is not None:
            return (
                self.reader if (start, stop) == (0, len(self)) else self.reader.window(start, stop)
            )
        if (start, stop) == (0, len(self)):
            return self.pair()
        return rows(self.x, slice(start, stop)), self.y[start:stop]

    def read(self, start: int, stop: int) -> Inputs:
        """The inputs of rows ``start:stop`` (only those rows are read)."""
        if self.reader is not None and self._x is None:
            return self.reader.read(start, stop)[0]
        return rows(self.x, slice(start, stop))

    def row_access(self) -> Any:
        """The inputs as numpy, indexable by rows (a dict for named inputs): the arrays when
        in memory, else views that read only the rows indexed (the summary's near-copy test
        reads one matched row per query)."""
        if self.reader is None or self._x is not None:
            return each(self.x, lambda v: v.numpy()) if isinstance(self.x, dict) else self.x.numpy()
        x1, _ = self.reader.read(0, 1)
        if isinstance(x1, dict):
            return {k: RowsView(self, k) for k in x1}
        return RowsView(self, None)

    def gather(self, index: np.ndarray) -> Inputs:
        """The inputs of rows ``index`` (positions; only those rows are read)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        if self.reader is not None and self._x is None:
            return gather(self.reader, idx, len(self.reader))[0]
        return rows(self.x, idx)

    def flat_rows(self) -> Any:
        """The inputs as flattened rows [n, features] (:func:`flat_inputs`): the array when the
        inputs are in memory, else a :class:`FlatRows` view that reads only the rows indexed."""
        if self.reader is not None and self._x is None:
            return FlatRows(self)
        return flat_inputs(self.x)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        if self.reader is not None and self._x is None:
            return Split(
                self.name, None, self.y[:n], self.ids[:n], self.provenance, self.classes,
                self.reader.window(0, n),
            )  # fmt: skip
        return Split(
            self.name, rows(self.x, slice(0, n)), self.y[:n], self.ids[:n], self.provenance,
            self.classes,
        )  # fmt: skip


def flat_inputs(x: Inputs) -> np.ndarray:
    """Inputs as numpy rows [n, features]: one array flattened per example, or several named
    inputs side by side as float64 (the review draws them as one strip)."""
    if isinstance(x, dict):
        return np.concatenate([flat_inputs(v).astype(np.float64) for v in x.values()], axis=1)
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return arr.reshape(len(arr), -1)


class FlatRows:
    """A lazy split's inputs as flattened rows [n, features] (:func:`flat_inputs`), read only
    where indexed: the review draws the rows it shows and scans the set in blocks for its
    display range, so a parquet, image-folder or HF split is never read whole for it."""

    def __init__(self, split: Split) -> None:
        self.split = split
        first = flat_inputs(split.read(0, 1))
        self.shape = (len(split), first.shape[1])
        self.dtype = first.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return flat_inputs(self.split.read(start, max(start, stop)))
            index = np.arange(start, stop, step)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} of {len(self)}")
            return self[np.array([i])][0]
        return flat_inputs(self.split.gather(np.asarray(index, dtype=np.int64)))


class RowsView:
    """One input of a lazy split, indexable by rows (``view[idx]`` reads only rows ``idx``)."""

    def __init__(self, split: Split, key: str | None) -> None:
        self.split, self.key = split, key

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Any) -> np.ndarray:
        x = self.split.gather(np.asarray(index, dtype=np.int64))
        part = x[self.key] if isinstance(x, dict) and self.key is not None else x
        assert isinstance(part, torch.Tensor)
        return part.numpy()


class SplitReader:
    """Rows of a lazy split by range, for the engine (:class:`mirrorinf.engine.RowReader`):
    inputs read from the source and validated per read; targets validated once at load."""

    def __init__(
        self,
        source: RowSource,
        where: str,
        y: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.source, self.where, self.y = source, where, y
        self.start, self.stop = start, len(y) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, stop: int) -> SplitReader:
        """Rows ``start:stop`` of this reader as a reader (a shard reads only its rows)."""
        a, b = self.start + start, self.start + min(stop, len(self))
        return SplitReader(self.source, self.where, self.y, a, b)

    def _y(self, a: int, b: int) -> torch.Tensor:
        return self.y[a:b]

    def read(self, start: int, stop: int, aligned: bool = True) -> tuple[Inputs, torch.Tensor]:
        """Rows ``start:stop`` (relative to this reader) as validated tensors; ``aligned``:
        copied to 64-byte aligned memory when the file's layout leaves them unaligned (the
        CPU kernels' rounding depends on alignment, so scores equal an in-memory tensor's)."""
        a, b = self.start + start, self.start + min(stop, len(self))
        b = max(a, b)
        x = _inputs(self.source.rows(a, b).x, self.where)
        return (_aligned_inputs(x) if aligned else x), self._y(a, b)

    def batches(self, size: int, start: int, stop: int) -> Any:
        """(x, y) of rows ``start:stop`` in batches of ``size``, in order (the source's own
        loader when it has one, e.g. images decoded in worker processes)."""
        a, b = self.start + start, self.start + min(stop, len(self))
        for at, raw in _raw_batches(self.source, size, a, b):
            n = len(raw.y)
            yield _aligned_inputs(_inputs(raw.x, self.where)), self._y(at, at + n)
            release = getattr(self.source, "release", None)
            if callable(release):
                release()


def _raw_batches(source: RowSource, size: int, start: int, stop: int) -> Any:
    """(start, Raw) of rows ``start:stop`` of ``source`` in batches of ``size``, in order."""
    own = getattr(source, "batches", None)
    if callable(own):
        at = start
        for raw in own(size, start, stop):
            yield at, raw
            at += len(raw.y)
        return
    for at in range(start, stop, size):
        yield at, source.rows(at, min(at + size, stop))


_BLOCK_BYTES = 64 << 20  # rows per block of the validation pass: about this many input bytes


def _row_bytes(raw: Raw) -> int:
    xs = raw.x.values() if isinstance(raw.x, dict) else [raw.x]
    return max(1, sum(int(np.asarray(v[:1]).nbytes) for v in xs if np.ndim(v)))


def _lazy_split(
    source: RowSource, name: str, where: str, kind: str
) -> tuple[torch.Tensor, np.ndarray, SplitReader]:
    """Validate every row of ``source`` in one streaming pass (inputs per block, never all at
    once) and return the targets, ids and a reader of the split's rows."""
    n = len(source)
    if n == 0:
        raise DataError(f"{where}: the dataset is empty")
    first = source.rows(0, 1)
    block = max(1, min(65536, _BLOCK_BYTES // _row_bytes(first)))
    ys: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for _, raw in itertools.chain([(0, first)], _raw_batches(source, block, 1, n)):
        _inputs(raw.x, where)
        ys.append(np.array(raw.y))
        if raw.ids is not None:
            ids.append(np.array(raw.ids))
        release = getattr(source, "release", None)
        if callable(release):
            release()
    yt = _targets(np.concatenate(ys), n, where, kind)
    id_arr = _check_ids(np.concatenate(ids) if ids else None, n, where)
    return yt, id_arr, SplitReader(source, where, yt)


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures, never bad input (it will not heal)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the state could not give its exception back: let it retry
        return True
    return not isinstance(exc, InputError)


def _input(x: np.ndarray, where: str, name: str) -> torch.Tensor:
    """One input array as a tensor: floats (and bools) as float32, integers as int64."""
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise DataError(
            f"{where}: {name} must be a numeric array [n, ...], got {x.dtype} {x.shape}"
        )
    if 0 in x.shape[1:]:
        raise DataError(f"{where}: {name} has no features (rows of shape {x.shape[1:]})")
    if x.dtype.kind in "iu":
        if x.dtype.kind == "u" and x.size and int(x.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{where}: {name} holds integers beyond int64")
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.int64, copy=False)))
    xf = x.astype(np.float32, copy=False)
    step = max(1, (16 << 20) // max(1, xf[:1].nbytes))  # the check in blocks of ~16 MB
    axes = tuple(range(1, xf.ndim))
    n_bad = sum(
        int((~np.isfinite(xf[s : s + step])).any(axis=axes).sum()) for s in range(0, len(xf), step)
    )
    if n_bad:
        raise DataError(f"{where}: {n_bad} row(s) of {name} contain NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(xf))


_LABEL_HINT = {
    "classification": "integer class indices",
    "binary": "0/1 labels",
    "sequence": "integer token labels (-100 = ignored)",
}


def _targets(y: np.ndarray, n: int, where: str, kind: str) -> torch.Tensor:
    """Targets as the task kind reads them (see the module docstring); DataError naming the
    kind that would fit when they cannot be."""
    if y.ndim == 0 or len(y) != n:
        raise DataError(f"{where}: y must be one label per row of x ({n}), got {y.shape}")
    if n == 0:
        raise DataError(f"{where}: the dataset is empty")
    if y.dtype.kind not in "fiub":
        raise DataError(f"{where}: targets must be numeric, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError(f"{where}: labels contain NaN or inf")
    whole = y.dtype.kind != "f" or bool(np.equal(np.mod(y, 1), 0).all())
    is01 = bool(np.isin(y, (0, 1)).all())
    if kind in ("regression", "multilabel"):
        if kind == "multilabel" and (y.ndim != 2 or not is01):
            fit = "binary" if y.ndim == 1 and is01 else "classification" if whole else None
            hint = f"; set task.kind: {fit}" if fit and y.ndim == 1 else ""
            raise DataError(
                f"{where}: multilabel targets must be 0/1 of shape [n, labels], got {y.dtype} "
                f"{y.shape}{hint}"
            )
        return torch.from_numpy(np.ascontiguousarray(y.astype(np.float32)))
    want = 2 if kind == "sequence" else 1
    if y.ndim != want:
        hint = ""
        if y.ndim == 2 and is01:
            hint = "; for 0/1 targets per label set task.kind: multilabel"
        elif y.ndim == 2 and not whole:
            hint = "; for several real targets set task.kind: regression"
        raise DataError(
            f"{where}: {kind} needs y of shape [n{', T' if want == 2 else ''}] "
            f"({_LABEL_HINT[kind]}), got {y.shape}{hint}"
        )
    if not whole:
        raise DataError(
            f"{where}: labels must be {_LABEL_HINT[kind]}, got fractions; for real-valued "
            "targets set task.kind: regression"
        )
    if kind == "binary" and not is01:
        fit = "classification" if (y >= 0).all() else None
        raise DataError(
            f"{where}: binary targets must be 0/1, found values in [{y.min()}, {y.max()}]"
            + (f"; for class indices set task.kind: {fit}" if fit else "")
        )
    floor = -100 if kind == "sequence" else 0
    if (y < floor).any() or (kind == "sequence" and ((y < 0) & (y != -100)).any()):
        bad = int((y < 0).sum()) if kind != "sequence" else int(((y < 0) & (y != -100)).sum())
        raise DataError(f"{where}: labels out of range: {bad} negative label(s)")
    return torch.from_numpy(y.astype(np.int64))


def _inputs(x: RawX, where: str) -> Inputs:
    """Inputs (one array or named arrays) as validated tensors."""
    if isinstance(x, dict):
        xt: Inputs = {k: _input(v, where, f"x_{k}") for k, v in x.items()}
        sizes = {k: len(v) for k, v in xt.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"{where}: the named inputs differ in their number of rows: {sizes}")
        return xt
    return _input(x, where, "x")


def _check_ids(ids: np.ndarray | None, n: int, where: str) -> np.ndarray:
    """ids as given (unique, one per row, integers or strings), or positions when none."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    if ids.ndim != 1 or len(ids) != n:
        raise DataError(f"{where}: ids must be one per row ({n}), got shape {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{where}: ids are not unique")
    if ids.dtype.kind == "f":  # parquet ints with nulls come back as floats
        raise DataError(f"{where}: ids must be integers or strings, got {ids.dtype}")
    return ids.astype(str) if ids.dtype.kind in "OUS" else ids.astype(np.int64)


def _validate(
    x: RawX, y: np.ndarray, ids: np.ndarray | None, where: str, kind: str = "classification"
) -> tuple[Inputs, torch.Tensor, np.ndarray]:
    xt = _inputs(x, where)
    yt = _targets(y, len(next(iter(xt.values()))) if isinstance(xt, dict) else len(xt), where, kind)
    return xt, yt, _check_ids(ids, len(y), where)


def load_dataset(
    path: str | Path,
    *,
    name: str = "data",
    source: str = "file",
    repo: str | Path | None = None,
    rev: str | None = None,
    label_column: str = "label",
    display_path: str | None = None,
    kind: str = "classification",
    fmt: str = "auto",
    image: dict[str, Any] | None = None,
    columns: dict[str, Any] | None = None,
    factory: str | None = None,
) -> Split:
    """Load a dataset from a local file or folder (``source="file"``), a DVC repo at ``rev``,
    or the user's Dataset factory.

    Args:
        path: the file or folder; for DVC, relative to the repository root.
        name: what the set is ("train", "val", "query"), used in messages; the factory's
            argument.
        repo, rev: DVC repository and git revision (None = workspace).
        label_column: label column of parquet files (and of datasets folders, unless
            ``columns`` names one).
        display_path: path as the user wrote it, for provenance (defaults to ``path``).
        kind: the task kind (params ``task.kind``), which says how targets are read.
        fmt, image, columns, factory: params ``data.format``, ``data.image``, ``data.columns``
            and ``data.factory`` (see :class:`mirrorinf.params.DataParams`).

    Raises:
        DataError: missing file, path or revision; unsupported format; corrupt file; bad
            contents (NaN/inf features, non-integer or negative labels, duplicate ids).
    """
    path = str(path)
    shown = display_path or path
    if factory:
        shown = f"{factory}({name!r})"
    if source not in ("file", "dvc"):
        raise DataError(f"unknown data source {source!r}; use 'file' or 'dvc'")
    repo_s = str(repo if repo is not None else ".") if source == "dvc" else None
    at = f" (DVC {repo_s}@{rev or 'workspace'})" if source == "dvc" and not factory else ""
    where = f"{name} set {shown!r}{at}"
    opts = {"image": image or {}, "columns": columns or {}, "label_column": label_column}
    lazy: RowSource | None = None
    with dvc_opened(path, source, repo_s, rev, fmt, factory, where) as opened:
        local, commit = opened.local, opened.commit
        if factory:
            fmt = "factory"
        elif opened.md5 is not None and fmt == "auto":
            fmt = fmt_of(path)  # a DVC cache object is named by its md5, not the path
        elif local is not None:
            fmt = detect_format(local, fmt, where)
        elif fmt == "auto":
            fmt = fmt_of(path)
        classes = None
        if fmt in ("npz", "parquet") and local is not None and not opened.copy:
            read_local(local, read=False)
            lazy = (
                NpzRows(local, where) if fmt == "npz" else ParquetRows(local, where, label_column)
            )
            lazy.md5 = file_md5(local)
            lazy.check()  # the digest is of the bytes the rows are read from
            opened.verify(lazy.md5, where)  # a DVC cache object: the revision's md5
        elif fmt in ("npz", "parquet"):
            blob = read_dvc(path, repo_s, rev)[0] if local is None else read_local(local)
            md5 = hashlib.md5(blob).hexdigest()
            if fmt == "npz":
                x, y, ids = parse_npz(blob, where)
            else:
                x, y, ids = parse_parquet(blob, where, label_column)
        else:
            reader = open_rows(fmt, local, name, where, factory, opts)
            classes = reader.classes
            opened.verify_files(getattr(reader, "file_md5", {}), where)
            if not opened.copy:
                lazy = reader
                opened.keep_for(reader)  # links to DVC cache objects live while it reads
            else:  # a DVC folder is a temporary copy: read it while it exists
                raw = reader.rows(0, len(reader))
                x, y, ids, md5 = raw.x, raw.y, raw.ids, reader.md5
    split_reader = None
    if lazy is not None:
        yt, ids, split_reader = _lazy_split(lazy, name, where, kind)
        md5, xt = lazy.md5, None
    else:
        xt, yt, ids = _validate(x, y, ids, where, kind)
    prov = Provenance(
        source="factory" if factory else source, path=shown, md5=md5, repo=repo_s, rev=rev,
        commit=commit, format=fmt, classes=classes,
    )  # fmt: skip
    logger.info("loaded %s: %d examples, md5 %s", where, len(yt), md5)
    return Split(name, xt, yt, ids, prov, classes, split_reader)


def check_labels(data: Split, n_classes: int) -> None:
    """DataError if a label is not a valid class index of a model with ``n_classes`` outputs
    (classification), naming the task kind that would fit a one-output model."""
    top = int(data.y.max())
    if top >= n_classes:
        n_bad = int((data.y >= n_classes).sum())
        hint = ""
        if n_classes == 1:
            is01 = bool(((data.y == 0) | (data.y == 1)).all())
            fit = "binary" if is01 else "regression"
            targets = "0/1" if is01 else "numbers"
            hint = f". The model has 1 output and the targets are {targets}: set task.kind: {fit}"
        raise DataError(
            f"{data.name} set {data.provenance.path!r}: labels out of range: {n_bad} label(s) "
            f">= {n_classes} (max {top}) but the model has {n_classes} outputs{hint}"
        )


def read_json(
    path: str | Path,
    *,
    source: str = "file",
    repo: str | Path | None = None,
    rev: str | None = None,
) -> dict[str, Any]:
    """A small JSON file (e.g. demo ground truth) from a local file or a DVC repo."""
    if source == "dvc":
        blob, _ = read_dvc(str(path), str(repo or "."), rev)
    else:
        blob = read_local(path)
    try:
        data = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def ensure_writable(dirs: dict[str, Path], create: bool = True) -> None:
    """Check that each folder can be written before a run starts anything: create it and write
    a probe file in it, or (``create=False``) check the nearest existing folder on its path.

    Raises:
        InputError: naming the key and the folder, for the first one that cannot be written
            (a file in the way, no permission, a read-only disk).
    """
    for key, folder in dirs.items():
        try:
            if not create:
                near = next(p for p in (folder, *folder.parents) if p.exists())
                if not near.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, f"{near} is not a folder")
                if not os.access(near, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "permission denied")
                continue
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".mirrorinf-probe-"):
                pass
        except OSError as err:
            raise InputError(
                f"{key}: cannot write to {folder} ({err.strerror or err}); point {key} at a "
                "writable folder"
            ) from None


def write_npz(path: str | Path, x: Any, y: Any, ids: Any = None) -> str:
    """Write a dataset as .npz (atomically); returns the md5 of the file."""
    arrays = {"x": np.asarray(x), "y": np.asarray(y)}
    if ids is not None:
        arrays["ids"] = np.asarray(ids)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_npy(path: str | Path, array: Any) -> None:
    """Write one array as .npy atomically (temp name + rename)."""
    atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, so identical content gives identical bytes)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


load_dataset_task = task(
    load_dataset,
    name="load-data",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)


def prepare_demo(
    demo: dict[str, Any], train_path: str | Path, val_path: str | Path, query_path: str | Path
) -> Path:
    """Write the embedded demo splits and ground truth; skip when already there and current.

    The ground truth goes to ``ground_truth.json`` beside the training file and records the demo
    params, so changed params (or a missing file) regenerate everything. Returns its path.
    """
    from mirrorinf.demo import make_demo

    paths = [Path(train_path), Path(val_path), Path(query_path)]
    truth_path = paths[0].parent / "ground_truth.json"
    if all(p.is_file() for p in [*paths, truth_path]):
        try:
            if json.loads(truth_path.read_text()).get("params") == demo:
                logger.info("demo data up to date in %s", truth_path.parent)
                return truth_path
        except (ValueError, OSError):
            pass
    data = make_demo(**demo)
    for p, split in zip(paths, (data.train, data.val, data.query), strict=True):
        write_npz(p, split.x, split.y, split.ids)
    write_json(truth_path, {"params": demo, **data.ground_truth()})
    logger.info("demo data written to %s", truth_path.parent)
    return truth_path


prepare_demo_task = task(
    prepare_demo, name="prepare-demo", cache_policy=NO_CACHE, persist_result=False
)
