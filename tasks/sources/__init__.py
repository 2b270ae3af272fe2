"""Readers for dataset sources beyond single .npz / .parquet files, each readable by row range.

A :class:`RowSource` knows its length, its provenance digest and (for image folders) its class
names, and gives any row range ``rows(start, stop)`` as raw numpy arrays without reading the
others, so shards and a later streaming loader can read only their rows. Sources:

- ``images``: an image folder ``root/<class>/*.png|jpg|jpeg`` (:mod:`.images`);
- ``hf``: a HuggingFace ``datasets`` folder written by ``save_to_disk`` (:mod:`.hf`);
- ``factory``: the user's function returning a map-style torch Dataset (:mod:`.factory`).

:func:`detect_format` tells the format of a path for ``data.format: auto``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mirrorinf.errors import DataError

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "ImageOptions",
    "Raw",
    "RowSource",
    "detect_format",
    "file_md5",
    "tree_digest",
]

FORMATS = ("auto", "npz", "parquet", "images", "hf")
FILE_SUFFIXES = {".npz": "npz", ".parquet": "parquet", ".pq": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HF_MARKERS = ("dataset_info.json", "state.json")

RawX = np.ndarray | dict[str, np.ndarray]


@dataclass
class Raw:
    """Rows as read, before validation: inputs (one array or named arrays), targets, ids."""

    x: RawX
    y: np.ndarray
    ids: np.ndarray | None


@dataclass(frozen=True)
class ImageOptions:
    """How image files become tensors (params ``data.image``)."""

    mode: str = "RGB"
    size: tuple[int, int] | None = None  # (height, width); None: keep, all must be equal
    mean: tuple[float, ...] | None = None  # per channel, after scaling to [0, 1]
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Columns:
    """Columns of a HuggingFace datasets folder (params ``data.columns``)."""

    inputs: tuple[str, ...] = ("x",)
    label: str = "label"
    id: str | None = None


class RowSource(Protocol):
    """A dataset readable by row range."""

    md5: str
    classes: tuple[str, ...] | None

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> Raw: ...


def file_md5(path: Path) -> str:
    """md5 of one file, read in 1 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path, files: Iterable[Path]) -> str:
    """md5 over the sorted (path relative to ``root``, file md5) list: names and bytes both."""
    h = hashlib.md5()
    for rel in sorted(Path(f).relative_to(root).as_posix() for f in files):
        h.update(f"{rel}\0{file_md5(root / rel)}\n".encode())
    return h.hexdigest()


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def detect_format(path: Path, fmt: str, where: str) -> str:
    """The format of a local ``path`` (``fmt`` = params ``data.format``; "auto" guesses)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(
                f"{where}: this is a HuggingFace DatasetDict (splits: {', '.join(splits)}); "
                "point the path at one split's folder, e.g. "
                f"{path.name}/{splits[0] if splits else 'train'}"
            )
        if any((path / m).is_file() for m in HF_MARKERS):
            return "hf"
        if any(p.is_dir() and _has_images(p) for p in path.iterdir()):
            return "images"
        raise DataError(
            f"{where}: a folder, but neither a HuggingFace datasets folder (no "
            "dataset_info.json / state.json) nor an image folder (no class subfolders holding "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files); set data.format or fix the path"
        )
    suffix = path.suffix.lower()
    if not suffix and not path.exists() and not path.is_symlink():
        raise DataError(f"{where}: data path not found: {path}")
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported dataset format {suffix or '(no extension)'!r}; use .npz "
            "(x, y, optional ids), .parquet, an image folder, a HuggingFace datasets folder, "
            "or data.factory"
        )
    return FILE_SUFFIXES[suffix]


def as_tuple(value: Any) -> tuple[Any, ...] | None:
    """A list from params as a tuple (None stays None)."""
    return None if value is None else tuple(value)
