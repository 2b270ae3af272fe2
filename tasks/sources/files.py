"""Reading a dataset's bytes or folder: a local path or a DVC repository at a revision, and
the .npz / .parquet parsers (``tasks.data.load_dataset`` validates what they return).

DVC errors become :class:`DataError` naming the problem; a DVC folder (an image folder, a
datasets folder) is copied to a temporary folder that lives while it is read.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import FILE_SUFFIXES, RawX
from mirrorinf.tasks.sources.arrays import npz_inputs

__all__ = ["dvc_opened", "fmt_of", "parse_npz", "parse_parquet", "read_dvc", "read_local"]


def fmt_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported dataset format {suffix or '(no extension)'!r}; "
            "use .npz (x, y, optional ids) or .parquet"
        )
    return FILE_SUFFIXES[suffix]


def read_local(path: str | Path, read: bool = True) -> bytes:
    """The bytes of a local data file (``read=False``: only check that it can be read)."""
    p = Path(path)
    try:
        p.stat()  # the real reason (a symlink loop, no permission), not always "not found"
    except FileNotFoundError:
        broken = " (a symlink to a missing file)" if p.is_symlink() else ""
        raise DataError(f"data file not found: {p}{broken}") from None
    except OSError as err:
        loop = " (a symlink loop)" if err.errno == errno.ELOOP else ""
        raise DataError(f"cannot read data file {p}: {err.strerror or err}{loop}") from None
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    if not read:
        if not os.access(p, os.R_OK):
            raise DataError(f"cannot read data file {p}: permission denied")
        return b""
    try:
        return p.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {p}: {err}") from None


@contextmanager
def _dvc_fs(path: str, repo: str, rev: str | None) -> Iterator[Any]:
    """DVC's filesystem of ``repo`` at ``rev``; its errors as DataErrors naming the problem."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import NotDvcRepoError
    from dvc.scm import CloneError, RevError

    where = f"DVC repo {repo!r} at rev {rev or 'workspace'!r}"
    fs = None
    try:
        fs = DVCFileSystem(repo, rev=rev)
        yield fs
    except RevError:
        raise DataError(f"unknown git revision {rev!r} in {where.split(' at ')[0]}") from None
    except (NotDvcRepoError, CloneError) as err:
        raise DataError(f"{repo!r} is not a DVC/git repository that can be opened: {err}") from None
    except FileNotFoundError:
        raise DataError(f"{path!r} not found in {where}") from None
    except IsADirectoryError:
        raise DataError(f"{path!r} is a directory in {where}, expected a file") from None
    finally:
        close = getattr(fs, "close", None)
        if callable(close):
            close()


def _commit(fs: Any) -> str | None:
    try:
        return str(fs.repo.get_rev())
    except Exception:  # no git (or an unusual repo): the md5 still pins the data
        return None


def read_dvc(path: str, repo: str, rev: str | None) -> tuple[bytes, str | None]:
    """Bytes of ``path`` in DVC repo ``repo`` at ``rev`` and the resolved git commit."""
    with _dvc_fs(path, repo, rev) as fs:
        with fs.open(path, "rb") as f:
            blob = f.read()
        return blob, _commit(fs)


@contextmanager
def _dvc_folder(path: str, repo: str, rev: str | None) -> Iterator[tuple[Path, str | None]]:
    """A folder of a DVC repo at ``rev``, copied to a temporary folder (removed afterwards),
    and the resolved git commit."""
    with _dvc_fs(path, repo, rev) as fs, tempfile.TemporaryDirectory(prefix="mirrorinf-") as tmp:
        _ = fs.repo  # opens the revision now: an unknown rev is a RevError, not "not found"
        if not fs.exists(path):
            raise FileNotFoundError(path)
        local = Path(tmp) / (Path(path).name or "data")
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
        yield local, _commit(fs)


def parse_npz(blob: bytes, where: str) -> tuple[RawX, np.ndarray, np.ndarray | None]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            names = set(npz.files)
            named = npz_inputs(names, where)
            x: RawX = {n: npz[f"x_{n}"] for n in named} if named else npz["x"]
            return x, npz["y"], (npz["ids"] if "ids" in names else None)
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(f"{where}: corrupt or unreadable .npz file: {err}") from None


def parse_parquet(
    blob: bytes, where: str, label_column: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    import pandas as pd

    try:
        df = pd.read_parquet(io.BytesIO(blob))
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{where}: corrupt or unreadable parquet file: {err}") from None
    if label_column not in df.columns:
        raise DataError(
            f"{where}: label column {label_column!r} not found "
            f"(columns: {', '.join(map(str, df.columns))}); set data.label_column"
        )
    ids = df["id"].to_numpy() if "id" in df.columns else None
    features = df.drop(columns=[c for c in (label_column, "id") if c in df.columns])
    bad = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise DataError(f"{where}: non-numeric feature column(s): {', '.join(bad)}")
    if features.shape[1] == 0:
        raise DataError(f"{where}: no feature columns besides the label")
    return features.to_numpy(dtype=np.float32), df[label_column].to_numpy(), ids


@contextmanager
def dvc_opened(
    path: str,
    source: str,
    repo: str | None,
    rev: str | None,
    fmt: str,
    factory: str | None,
    where: str,
) -> Iterator[tuple[Path | None, str | None]]:
    """(local path, git commit) to read: the path itself, a DVC folder copied to a temporary
    folder, or (None, commit) for a single DVC file (read as bytes)."""
    if factory or source == "file":
        yield (None if factory else Path(path)), None
        return
    assert repo is not None
    with _dvc_fs(path, repo, rev) as fs:
        _ = fs.repo  # opens the revision now: an unknown rev is a RevError, not "not found"
        if not fs.exists(path):
            raise FileNotFoundError(path)
        is_dir = fs.isdir(path)
        commit = _commit(fs)
    if not is_dir:
        if fmt not in ("auto", "npz", "parquet"):
            raise DataError(f"{where}: data.format {fmt} needs a folder, {path!r} is a file")
        yield None, commit
        return
    with _dvc_folder(path, repo, rev) as (local, commit):
        yield local, commit
