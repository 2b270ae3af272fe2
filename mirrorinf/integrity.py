"""Authenticated, data-only records for caches and shards: arrays as .npy, metadata as JSON.

A record ``<name>`` in a folder is ``<name>.json`` plus one ``<name>.<array>.npy`` per array. The
JSON holds the metadata and, for every array, its sha256, shape and dtype; it is written last
(atomically), so a crash leaves a record either absent or complete. On read every array file is
hashed and compared, loaded with ``allow_pickle=False`` and checked against its shape and dtype;
any mismatch (bad HMAC, digest, truncation, shape, dtype, unparsable JSON) is logged as a warning
naming the file and the reason, the record is discarded, and the caller recomputes.

Threat model. The JSON is authenticated with HMAC-SHA256 under a per-user secret kept outside the
project folder (:func:`cache_key_path`: ``$MIRRORINF_CACHE_KEY_FILE``, else
``$XDG_CONFIG_HOME/mirrorinf/cache.key``, else ``~/.config/mirrorinf/cache.key``; 32 random bytes,
mode 0600, created on first use). The MAC covers the record's kind, context (e.g. the shard
store's identity) and name, so a record is valid only where it was written.
- Defended: anyone who can write the project folder but not read your key (a restored CI cache, a
  shared volume, a copied checkout, a planted file): their records never verify, so they can
  neither run code (nothing is unpickled, ever) nor change a verdict; a crash or a torn copy is
  detected the same way.
- Not defended: someone who can read your key file (your account, your home directory, root),
  who can sign anything; and deleting records (that only costs a recomputation).
Sharing a cache between users or machines means sharing the key file (same path or the variable).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.errors import InputError
from mirrorinf.io import atomic_write

__all__ = [
    "NpyFile",
    "RecordError",
    "RowBlocks",
    "SignedRecords",
    "cache_key",
    "cache_key_path",
    "read_regular",
    "remove_stale_tmp",
    "verified_memmap",
    "write_npy",
]

log = logging.getLogger(__name__)

FORMAT = "mirrorinf-record/1"
KEY_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ARRAY = re.compile(r"^[a-z][a-z0-9_]*$")


class RecordError(Exception):
    """A record that must not be used: which file, and why."""

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason, self.path = reason, path


def cache_key_path() -> Path:
    """Where the per-user HMAC key lives (outside any project; see the module docstring)."""
    explicit = os.environ.get("MIRRORINF_CACHE_KEY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(config) / "mirrorinf" / "cache.key"


def cache_key() -> bytes:
    """The per-user secret, created (0600, atomically, never overwritten) on first use."""
    path = cache_key_path()
    fix = "delete it to create a new key, or set MIRRORINF_CACHE_KEY_FILE to another path"
    if not path.exists():
        try:
            _create_key(path)
        except OSError as err:
            raise InputError(
                f"cannot create the cache key file {path}: {err.strerror or err}; set "
                "MIRRORINF_CACHE_KEY_FILE to a writable path outside the project"
            ) from None
    try:
        key = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read the cache key file {path}: {err.strerror}; {fix}") from None
    if len(key) != KEY_BYTES:
        raise InputError(f"cache key file {path} holds {len(key)} bytes, not {KEY_BYTES}; {fix}")
    return key


def _create_key(path: Path) -> None:
    """Write 32 random bytes to a 0600 temp file, then link it to ``path`` unless one is there
    already (two first runs at once agree on one key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another first run won: use its key
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_tmp(folder: Path, prefix: str = "", keep: Iterable[Path] = ()) -> list[Path]:
    """Delete temp files left by a killed :func:`mirrorinf.io.atomic_write` or
    :meth:`SignedRecords.new_array` in ``folder`` (``.<prefix>*.tmp``, except those in ``keep``:
    this run's own); call only while no other writer uses that prefix there."""
    removed = []
    mine = {Path(p) for p in keep}
    if folder.is_dir():
        for path in folder.glob(f".{prefix}*.tmp"):
            if path.is_file() and path not in mine:
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of killed writes in %s", len(removed), folder)
    return removed


MAX_RECORD_BYTES = 64 * 2**20  # a record's JSON (metadata and reports) is far smaller


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading if it is a regular file (a symlink to one is followed), else
    RecordError: a FIFO blocked the read forever and a device (/dev/zero) never ended, so a file
    planted in a record's place could stop every run. Opened non-blocking (a FIFO's open does not
    wait), then checked on the open file itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise RecordError(f"cannot read ({err.strerror})", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RecordError("not a regular file (a FIFO, device or socket put in its place)", path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (:func:`_open_regular`), at most ``limit`` of them."""
    with _open_regular(path) as fh:
        if limit is not None and os.fstat(fh.fileno()).st_size > limit:
            raise RecordError(f"larger than {limit} bytes", path)
        return bytes(fh.read())


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class SignedRecords:
    """A folder of authenticated records of one ``kind`` within one ``context``."""

    def __init__(self, root: str | Path, kind: str, context: str = "") -> None:
        self.root = Path(root)
        self.kind = kind
        self.context = context

    def _json(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid record name {name!r}")
        return self.root / f"{name}.json"

    def array_path(self, name: str, array: str) -> Path:
        """The file of one array of a record."""
        return self.root / f"{name}.{array}.npy"

    def _mac(self, body: dict[str, Any]) -> str:
        return hmac.new(cache_key(), _canonical(body), hashlib.sha256).hexdigest()

    def _body(self, name: str, arrays: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "context": self.context,
            "name": name,
            "meta": meta,
            "arrays": arrays,
        }

    def new_array(self, name: str, array: str, shape: tuple[int, ...], dtype: Any) -> NpyFile:
        """An array of record ``name`` to fill in place (:class:`NpyFile`), under a temporary
        name in the folder (``.<name>.<array>.npy.*.tmp``: a killed run's is removed by
        :func:`remove_stale_tmp`); :meth:`write` takes it into the record as ``filled``."""
        self._json(name)
        if not _ARRAY.match(array):
            raise ValueError(f"invalid array name {array!r}")
        return NpyFile.temporary(self.root / f"{name}.{array}.npy", shape, dtype)

    def write(
        self,
        name: str,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        blocks: dict[str, RowBlocks] | None = None,
        filled: dict[str, NpyFile] | None = None,
    ) -> None:
        """Each array (atomically, streamed and hashed in row blocks: no in-memory copy), then
        the signed JSON that references them (last). ``blocks``: arrays produced block by block
        (e.g. shards assembled into one score matrix) instead of held whole; ``filled``: arrays
        already written in place (:meth:`new_array`), hashed and renamed into the record."""
        target = self._json(name)
        entries = {}
        for array, done in sorted((filled or {}).items()):
            entries[array] = {
                "sha256": done.digest(),
                "shape": list(done.shape),
                "dtype": done.dtype.str,
            }
            done.commit(self.array_path(name, array))
        sources = {a: RowBlocks.of(v) for a, v in arrays.items()} | dict(blocks or {})
        for array, source in sorted(sources.items()):
            if not _ARRAY.match(array):
                raise ValueError(f"invalid array name {array!r}")
            sha = write_npy(self.array_path(name, array), source)
            entries[array] = {
                "sha256": sha,
                "shape": list(source.shape),
                "dtype": source.dtype.str,
            }
        body = self._body(name, entries, json.loads(json.dumps(meta)))
        record = {**body, "hmac": self._mac(body)}
        payload = json.dumps(record, sort_keys=True, indent=1).encode()
        atomic_write(target, lambda fh: fh.write(payload))

    def exists(self, name: str) -> bool:
        """A record file is there (not yet verified)."""
        return self._json(name).exists()

    def read(
        self, name: str, mmap: tuple[str, ...] = ()
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, meta) of a verified record; None when absent or invalid (then discarded,
        with a warning naming the file and the reason). Arrays named in ``mmap`` come back as
        read-only memory maps (:func:`verified_memmap`), the others in memory."""
        path = self._json(name)
        if not path.exists():
            return None
        try:
            return self._verified(name, path, mmap)
        except RecordError as err:
            log.warning("discarding %s: %s; it will be recomputed", err.path, err.reason)
            self.discard(name)
            return None

    def _verified(
        self, name: str, path: Path, mmap: tuple[str, ...] = ()
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        try:
            record = json.loads(read_regular(path, MAX_RECORD_BYTES))
        except (OSError, ValueError) as err:
            raise RecordError(f"unreadable or not JSON ({err})", path) from None
        if not isinstance(record, dict) or not isinstance(record.get("hmac"), str):
            raise RecordError("no HMAC (planted, or written by an older mirrorinf)", path)
        body = {k: v for k, v in record.items() if k != "hmac"}
        expected = self._mac(body)
        if not hmac.compare_digest(expected, record["hmac"]):
            raise RecordError("HMAC mismatch (forged, or signed with another user's key)", path)
        header = self._body(name, {}, {})
        if any(body.get(k) != header[k] for k in ("format", "kind", "context", "name")):
            raise RecordError("written for another record, kind or store", path)
        try:
            items = body["arrays"].items()
            specs = {a: (s["sha256"], list(s["shape"]), s["dtype"]) for a, s in items}
        except (KeyError, TypeError, AttributeError) as err:
            raise RecordError(f"malformed array list ({err})", path) from None
        arrays = {
            array: self._array(name, array, *spec, mapped=array in mmap)
            for array, spec in specs.items()
        }
        return arrays, body["meta"]

    def _array(
        self, name: str, array: str, sha: str, shape: list[int], dtype: str, mapped: bool = False
    ) -> np.ndarray:
        if not _ARRAY.match(array):
            raise RecordError(f"invalid array name {array!r}", self._json(name))
        path = self.array_path(name, array)
        if mapped:
            return verified_memmap(path, sha, shape, dtype)
        try:
            blob = read_regular(path)
        except OSError as err:
            raise RecordError(f"cannot read ({err.strerror})", path) from None
        if hashlib.sha256(blob).hexdigest() != sha:
            raise RecordError("sha256 mismatch (modified, truncated or replaced)", path)
        try:
            value = np.load(io.BytesIO(blob), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise RecordError(f"not a plain .npy array ({err})", path) from None
        if list(value.shape) != shape or value.dtype.str != dtype:
            got, want = f"{list(value.shape)} {value.dtype.str}", f"{shape} {dtype}"
            raise RecordError(f"shape/dtype {got} differs from the recorded {want}", path)
        return value

    def discard(self, name: str) -> None:
        """Remove a record: its JSON first (then it is absent), then its array files."""
        self._json(name).unlink(missing_ok=True)
        for path in self.root.glob(f"{name}.*.npy"):
            if _ARRAY.match(path.name[len(name) + 1 : -len(".npy")]):
                path.unlink(missing_ok=True)


BLOCK_BYTES = 16 * 2**20  # bytes per block when streaming an array to or from disk


class RowBlocks:
    """An array of known shape and dtype given as consecutive row blocks (C order), so that it
    can be written to disk without ever being whole in memory."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, blocks: Iterable[np.ndarray]) -> None:
        self.shape, self.dtype, self.blocks = tuple(shape), np.dtype(dtype), blocks

    @classmethod
    def of(cls, value: Any) -> RowBlocks:
        """An in-memory (or memory-mapped) array in blocks of about :data:`BLOCK_BYTES`."""
        arr = np.asarray(value)
        if arr.ndim == 0:
            return cls(arr.shape, arr.dtype, [arr])
        row = max(1, arr[:1].nbytes)
        step = max(1, BLOCK_BYTES // row)
        return cls(arr.shape, arr.dtype, (arr[i : i + step] for i in range(0, len(arr), step)))


class _Hashing:
    """A binary file handle that hashes what is written through it."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.n += len(view)
        return self.fh.write(view)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[bytes, dict[str, Any]]:
    """The .npy header of a C-order array (1.0 unless it cannot hold the shape, as np.save)."""
    if dtype.hasobject:
        raise ValueError("object arrays cannot be stored (no pickles)")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(shape)}  # fmt: skip
    head = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(head, header)
    except ValueError:
        head = io.BytesIO()
        np.lib.format.write_array_header_2_0(head, header)
    return head.getvalue(), header


class NpyFile:
    """A new .npy file of fixed shape and dtype, filled by numpy-style assignment of row blocks
    (``f[rows, cols] = block``) through plain file writes: no memory map, so what was written
    lives in the page cache and on disk, not in the process. Made under a temporary name by
    :meth:`SignedRecords.new_array` and renamed into a record by :meth:`SignedRecords.write`."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        if len(self.shape) != 2:
            raise ValueError(f"an NpyFile is [rows, columns], got shape {self.shape}")
        head, _ = _npy_header(self.shape, self.dtype)
        self.offset = len(head)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR)
        os.pwrite(self.fd, head, 0)
        os.ftruncate(self.fd, self.offset + self.shape[0] * self.row_bytes)

    def __setitem__(self, key: tuple[slice, Any], value: Any) -> None:
        """Write ``value`` into rows ``key[0]`` (a slice) and columns ``key[1]`` (a slice or an
        index array); a block of whole rows is one write, a column subset one read and write."""
        rows, cols = key
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows must be a contiguous slice")
        n = max(0, stop - start)
        at = self.offset + start * self.row_bytes
        whole = isinstance(cols, slice) and cols.indices(self.shape[1]) == (0, self.shape[1], 1)
        if whole:
            block = np.ascontiguousarray(value, dtype=self.dtype).reshape(n, self.shape[1])
        else:
            raw = bytearray(os.pread(self.fd, n * self.row_bytes, at))
            block = np.frombuffer(raw, dtype=self.dtype).reshape(n, self.shape[1])
            block[:, cols] = value
        if os.pwrite(self.fd, memoryview(block).cast("B"), at) != block.nbytes:
            raise OSError(f"short write to {self.path}")

    @classmethod
    def temporary(cls, final: Path, shape: tuple[int, ...], dtype: Any) -> NpyFile:
        """A new file beside ``final`` under a temporary name (``.<final name>.*.tmp``, as
        :func:`mirrorinf.io.atomic_write` names them), to be renamed by :meth:`commit`."""
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        try:
            return cls(Path(tmp), shape, dtype)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def commit(self, final: Path) -> None:
        """Flush, close and rename the complete file to ``final`` (atomically replacing it)."""
        os.fsync(self.fd)
        self.close()
        os.replace(self.path, final)
        self.path = final

    def digest(self, algorithm: str = "sha256") -> str:
        """The file's hex digest, read in blocks (after an fsync: the bytes a record names)."""
        os.fsync(self.fd)
        digest = hashlib.new(algorithm)
        pos, size = 0, os.fstat(self.fd).st_size
        while pos < size:
            chunk = os.pread(self.fd, min(BLOCK_BYTES, size - pos), pos)
            if not chunk:
                raise OSError(f"{self.path} ended at byte {pos} of {size}")
            digest.update(chunk)
            pos += len(chunk)
        return digest.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and remove the file (a failed or abandoned computation)."""
        self.close()
        self.path.unlink(missing_ok=True)


def write_npy(path: Path, source: RowBlocks) -> str:
    """Write ``source`` as a plain .npy at ``path`` atomically (temp name, renamed when
    complete), one block at a time; returns the file's sha256. A block of the wrong dtype or a
    row count that does not add up raises ValueError (and nothing is left behind)."""
    head, header = _npy_header(source.shape, source.dtype)
    out: dict[str, str] = {}

    def write(fh: Any) -> None:
        sink = _Hashing(fh)
        sink.write(head)
        rows = 0
        for block in source.blocks:
            block = np.ascontiguousarray(block)
            if block.dtype != source.dtype or block.shape[1:] != source.shape[1:]:
                raise ValueError(f"block {block.dtype} {block.shape} does not fit {header}")
            rows += len(block) if block.ndim else 1
            sink.write(block.data if block.nbytes else b"")
        if rows != (source.shape[0] if source.shape else 1):
            raise ValueError(f"{rows} rows written for shape {source.shape}")
        out["sha"] = sink.sha.hexdigest()

    atomic_write(path, write)
    return out["sha"]


def verified_memmap(path: Path, sha: str, shape: list[int], dtype: str) -> np.ndarray:
    """A read-only memory map of an .npy whose sha256 is ``sha``, hashed in blocks first.

    Verified and mapped through one open file: a file swapped in by a rename after the check is
    never the one mapped (an in-place write to the same file by someone who can write the
    folder, between check and use, is outside what this defends; see the module docstring).
    The whole file is read once to hash it; the caller's pass then reads it again (normally from
    the page cache)."""
    fh = _open_regular(path)  # the map keeps it; closed with the map
    with fh:
        digest = hashlib.sha256()
        while chunk := fh.read(BLOCK_BYTES):
            digest.update(chunk)
        if digest.hexdigest() != sha:
            raise RecordError("sha256 mismatch (modified, truncated or replaced)", path)
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            got_shape, fortran, got_dtype = (
                np.lib.format.read_array_header_1_0(fh)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(fh)
            )
        except (ValueError, OSError, EOFError) as err:
            raise RecordError(f"not a plain .npy array ({err})", path) from None
        if list(got_shape) != shape or got_dtype.str != dtype or fortran or got_dtype.hasobject:
            got, want = f"{list(got_shape)} {got_dtype.str}", f"{shape} {dtype}"
            raise RecordError(f"shape/dtype {got} differs from the recorded {want}", path)
        if math.prod(got_shape) == 0:
            return np.zeros(got_shape, dtype=got_dtype)
        return np.memmap(fh, dtype=got_dtype, mode="r", shape=tuple(got_shape),
                         offset=fh.tell())  # fmt: skip
