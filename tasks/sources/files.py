"""Reading a dataset's bytes or folder: a local path or a DVC repository at a revision, and
the .npz / .parquet parsers (``tasks.data.load_dataset`` validates what they return).

DVC errors become :class:`DataError` naming the problem. Data at a revision is read in place
from the local DVC cache where its objects are there (DVC resolves the revision's .dvc /
dvc.lock entry to their md5s and paths; each object is checked against its md5): a file is
opened as it is, a folder through a temporary folder of links to its objects. Otherwise a
file is read through DVC as bytes and a folder copied to a temporary folder (a logged note).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import FILE_SUFFIXES, RawX, file_md5
from mirrorinf.tasks.sources.arrays import npz_inputs

__all__ = ["Opened", "dvc_opened", "fmt_of", "parse_npz", "parse_parquet", "read_dvc", "read_local"]

log = logging.getLogger(__name__)


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


@dataclass
class Opened:
    """What :func:`dvc_opened` gives to read: ``local`` (a path, or None for bytes from
    :func:`read_dvc`), the resolved git commit, and for DVC cache objects what they must match:
    ``md5`` of a single object, ``manifest`` (relative path -> md5) of a folder of links."""

    local: Path | None
    commit: str | None
    md5: str | None = None
    manifest: dict[str, str] | None = None
    links: Path | None = None  # the temporary folder of links to the cache objects
    copy: bool = False  # ``local`` is a temporary copy, removed after the ``with``
    kept: bool = False

    def keep_for(self, owner: object) -> None:
        """Keep the folder of links until ``owner`` (the row source reading it) is gone."""
        if self.links is not None:
            weakref.finalize(owner, shutil.rmtree, self.links, True)
            self.kept = True

    def verify(self, got: str, where: str) -> None:
        """DataError (exit 2) when a single cache object's md5 is not the recorded one."""
        if self.md5 is not None and got != self.md5:
            raise DataError(_tampered(where, self.local, self.md5, got))

    def verify_files(self, got: dict[str, str], where: str) -> None:
        """DataError when a file of a linked folder, as its reader digested it, differs from
        the revision's manifest (the reader's own digests close the window after linking)."""
        for rel, md5 in got.items():
            want = (self.manifest or {}).get(rel)
            if want is not None and md5 != want:
                assert self.local is not None
                raise DataError(_tampered(where, (self.local / rel).resolve(), want, md5))


def _tampered(where: str, obj: Path | None, want: str, got: str) -> str:
    return (
        f"{where}: the DVC cache object {obj} does not match the md5 {want} recorded at this "
        f"revision (its bytes hash to {got}): the local DVC cache is corrupt or was modified; "
        "delete that file and run `dvc fetch` (or `dvc pull`) to restore it"
    )


def _cache_objects(fs: Any, path: str, is_dir: bool, where: str) -> dict[str, tuple[str, Path]]:
    """{relative path ("" for a file): (md5, cache object)} of a DVC-tracked ``path`` at the
    filesystem's revision, resolved by DVC (its index entry's md5, its cache's object path);
    {} with a logged note when any object is not in the local cache (or not DVC 3 md5)."""
    try:
        infos = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
        odb = fs.repo.cache.local
        if is_dir:
            _check_manifest(fs.info(path), odb, where)
        out: dict[str, tuple[str, Path]] = {}
        for name, info in infos.items():
            entry = (info.get("dvc_info") or {}).get("entry")
            hash_info = getattr(entry, "hash_info", None)
            if hash_info is None or hash_info.name != "md5" or not hash_info.value:
                why = "is not DVC-tracked with a DVC 3 md5"
                log.info("%s: %s %s: read through DVC, not from the cache", where, name, why)
                return {}
            obj = Path(odb.oid_to_path(hash_info.value))
            if not obj.is_file():
                log.info(
                    "%s: %s is not in the local DVC cache (%s): read through DVC instead of "
                    "streamed from the cache (`dvc fetch` first to stream it)",
                    where, name, obj,
                )  # fmt: skip
                return {}
            rel = Path(name).relative_to(path.strip("/")).as_posix() if is_dir else ""
            out[rel] = (str(hash_info.value), obj)
        return out
    except DataError:
        raise
    except Exception as err:  # an unusual repo or cache layout: DVC's own read still works
        log.info("%s: DVC cache not usable (%s): read through DVC", where, err)
        return {}


def _check_manifest(info: dict[str, Any], odb: Any, where: str) -> None:
    """DataError when a folder's ``.dir`` manifest in the cache (the list of its files and their
    md5s, which DVC read to list them) does not hash to the md5 recorded at the revision."""
    entry = (info.get("dvc_info") or {}).get("entry")
    value = str(getattr(getattr(entry, "hash_info", None), "value", "") or "")
    if not value.endswith(".dir"):
        return
    obj = Path(odb.oid_to_path(value))
    got = file_md5(obj) if obj.is_file() else None
    if got is not None and got != value[: -len(".dir")]:
        raise DataError(_tampered(where, obj, value, got))


def _link_folder(objects: dict[str, tuple[str, Path]], name: str, where: str) -> Path:
    """A temporary folder ``<tmp>/<name>`` of links (by relative path) to the cache objects,
    each verified against its md5 first (every byte); returns ``<tmp>``."""
    tmp = Path(tempfile.mkdtemp(prefix="mirrorinf-dvc-"))
    try:
        for rel, (md5, obj) in objects.items():
            got = file_md5(obj)
            if got != md5:
                raise DataError(_tampered(where, obj, md5, got))
            link = tmp / name / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(obj)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextmanager
def dvc_opened(
    path: str,
    source: str,
    repo: str | None,
    rev: str | None,
    fmt: str,
    factory: str | None,
    where: str,
) -> Iterator[Opened]:
    """What to read: the path itself; at a DVC revision the objects in the local DVC cache
    (a file opened in place, a folder as links to them, verified against the revision's
    md5s), the workspace copy (no revision), else a folder copied to a temporary folder or
    (local None) a single file read as bytes."""
    if factory or source == "file":
        yield Opened(None if factory else Path(path), None)
        return
    assert repo is not None
    with _dvc_fs(path, repo, rev) as fs:
        _ = fs.repo  # opens the revision now: an unknown rev is a RevError, not "not found"
        if not fs.exists(path):
            raise FileNotFoundError(path)
        is_dir = fs.isdir(path)
        commit = _commit(fs)
        workspace = Path(fs.repo.root_dir) / path if rev is None else None
        objects = {} if workspace is not None else _cache_objects(fs, path, is_dir, where)
    if not is_dir and fmt not in ("auto", "npz", "parquet"):
        raise DataError(f"{where}: data.format {fmt} needs a folder, {path!r} is a file")
    if workspace is not None and workspace.exists():  # what DVC reads there: the workspace
        yield Opened(workspace, commit)
        return
    if not is_dir:
        if objects:
            md5, obj = objects[""]
            yield Opened(obj, commit, md5=md5)
        else:
            yield Opened(None, commit)
        return
    if objects:
        name = Path(path).name or "data"
        links = _link_folder(objects, name, where)
        opened = Opened(links / name, commit, manifest={r: m for r, (m, _) in objects.items()})
        opened.links = links
        try:
            yield opened
        finally:
            if not opened.kept:
                shutil.rmtree(links, ignore_errors=True)
        return
    with _dvc_folder(path, repo, rev) as (local, commit):
        yield Opened(local, commit, copy=True)  # read while it exists
