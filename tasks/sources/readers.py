"""Open a row source of a given format (images, hf, factory) from params' options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirrorinf.errors import DataError
from mirrorinf.tasks.sources import Columns, ImageOptions, RowSource, as_tuple

__all__ = ["open_rows"]


def image_options(opts: dict[str, Any]) -> ImageOptions:
    """params ``data.image`` (a mapping) as :class:`ImageOptions`."""
    size = as_tuple(opts.get("size"))
    return ImageOptions(
        mode=opts.get("mode") or "RGB",
        size=None if size is None else (int(size[0]), int(size[-1])),
        mean=as_tuple(opts.get("mean")),
        std=as_tuple(opts.get("std")),
    )


def columns(opts: dict[str, Any], label_column: str) -> Columns:
    """params ``data.columns`` (a mapping) as :class:`Columns`; the label defaults to
    ``data.label_column``."""
    inputs = opts.get("inputs") or ["x"]
    return Columns(
        inputs=tuple([inputs] if isinstance(inputs, str) else inputs),
        label=opts.get("label") or label_column,
        id=opts.get("id"),
    )


def open_rows(
    fmt: str, local: Path | None, name: str, where: str, factory: str | None, opts: dict[str, Any]
) -> RowSource:
    """The row source for ``fmt``: an image folder, a datasets folder or the factory's Dataset."""
    if fmt == "factory":
        from mirrorinf.tasks.sources.factory import FactorySource

        return FactorySource(str(factory), name, where)
    if local is None or not local.is_dir():
        raise DataError(f"{where}: data.format {fmt} reads a folder; {local} is not one")
    if fmt == "images":
        from mirrorinf.tasks.sources.images import ImageFolder

        return ImageFolder(local, image_options(opts["image"]), where)
    if fmt == "hf":
        from mirrorinf.tasks.sources.hf import HFFolder

        return HFFolder(local, columns(opts["columns"], opts["label_column"]), where)
    raise DataError(f"{where}: unknown data.format {fmt!r}; use auto, npz, parquet, images or hf")
