"""An image folder ``root/<class>/*.png|jpg|jpeg`` as a lazily decoded torch Dataset.

Class index = position of the class folder in the sorted folder names; ids = each file's path
relative to ``root`` (``cat/001.png``). Each image is decoded with Pillow to RGB (or L), resized
to ``data.image.size`` when set, scaled to [0, 1] and normalised with ``data.image.mean`` /
``std`` when set (no normalisation beyond /255 otherwise): float32 ``[C, H, W]``. Only file
names, sizes and digests are read when the folder is opened; pixels are decoded per row, so any
row range can be read without decoding the others, and once per run: the uint8 pixels (after
the resize, before scaling and normalisation, which are per batch) go to an unnamed
memory-mapped temporary file that later passes read instead of decoding again.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirrorinf.errors import DataError
from mirrorinf.io import scratch_array
from mirrorinf.tasks.sources import IMAGE_SUFFIXES, ImageOptions, Raw

__all__ = ["ImageFolder"]

_MODES = {"RGB": 3, "L": 1}


class ImageFolder(torch.utils.data.Dataset):
    """Image files under class folders; ``self[i]`` is (image [C, H, W], class index)."""

    def __init__(self, root: Path, options: ImageOptions, where: str) -> None:
        self.root, self.options, self.where = Path(root), options, where
        if options.mode not in _MODES:
            raise DataError(f"{where}: data.image.mode must be RGB or L, got {options.mode!r}")
        channels = _MODES[options.mode]
        for key in ("mean", "std"):
            value = getattr(options, key)
            if value is not None and len(value) != channels:
                raise DataError(
                    f"{where}: data.image.{key} has {len(value)} value(s), mode "
                    f"{options.mode} has {channels} channel(s); give one per channel"
                )
        if options.std is not None and any(s <= 0 for s in options.std):
            raise DataError(f"{where}: data.image.std must be positive, got {options.std}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        pairs = [
            (f, c)
            for c, folder in enumerate(folders)
            for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        used = sorted({c for _, c in pairs})
        if not pairs:
            raise DataError(
                f"{where}: no class subfolders holding .png/.jpg/.jpeg files under {self.root}; "
                "lay the images out as <root>/<class>/<file>.png"
            )
        # only folders that hold images are classes (sorted names; indices stay dense)
        remap = {c: i for i, c in enumerate(used)}
        self.classes = tuple(folders[c].name for c in used)
        self.files = [f for f, _ in pairs]
        self.labels = np.array([remap[c] for _, c in pairs], dtype=np.int64)
        self.ids = np.array([f.relative_to(self.root).as_posix() for f in self.files])
        self.md5, sizes = self._scan()
        self._sizes = sizes
        self._lock = threading.Lock()
        self._pixels: np.ndarray | None = None
        self._have: np.ndarray | None = None
        if options.size is None and len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({f})" for (w, h), f in list(sizes.items())[:3])
            raise DataError(
                f"{where}: images differ in size: {shown}; set data.image.size: [height, width] "
                "to resize them all"
            )

    def _scan(self) -> tuple[str, dict[tuple[int, int], str]]:
        """Digest over (relative path, file md5) and the distinct sizes (from headers only)."""
        from PIL import Image, UnidentifiedImageError

        h = hashlib.md5()
        sizes: dict[tuple[int, int], str] = {}
        self.file_md5: dict[str, str] = {}
        for f, rel in sorted(zip(self.files, self.ids, strict=True), key=lambda t: t[1]):
            blob = f.read_bytes()  # read once: digest it, and the header gives the size
            self.file_md5[rel] = hashlib.md5(blob).hexdigest()
            h.update(f"{rel}\0{self.file_md5[rel]}\n".encode())
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    sizes.setdefault(img.size, rel)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"{self.where}: cannot read image {rel}: {err}") from None
        return h.hexdigest(), sizes

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        """Image ``i`` decoded from its file (checked against its md5), converted and resized:
        uint8 [H, W, C], the pixels before scaling and normalisation."""
        from PIL import Image

        opts = self.options
        try:
            blob = self.files[i].read_bytes()
        except OSError as err:
            raise DataError(f"{self.where}: cannot read image {self.ids[i]}: {err}") from None
        if hashlib.md5(blob).hexdigest() != self.file_md5[str(self.ids[i])]:
            raise DataError(
                f"{self.where}: image {self.ids[i]} changed since the folder was digested; "
                "run again on a stable folder"
            )
        try:
            with Image.open(io.BytesIO(blob)) as img:
                img = img.convert(opts.mode)
                if opts.size is not None:
                    img = img.resize((opts.size[1], opts.size[0]), Image.BILINEAR)
                arr = np.array(img, dtype=np.uint8)  # writable: torch warns on a read-only one
        except OSError as err:  # truncated or corrupt after the header
            raise DataError(f"{self.where}: cannot decode image {self.ids[i]}: {err}") from None
        arr = arr.reshape(*arr.shape[:2], -1)
        if arr.shape != self.shape:
            raise DataError(
                f"{self.where}: image {self.ids[i]} decodes to {arr.shape[1]}x{arr.shape[0]}, "
                f"not the {self.shape[1]}x{self.shape[0]} its header and the others have"
            )
        return arr

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every decoded image."""
        size = self.options.size or next(iter(self._sizes))[::-1]
        return int(size[0]), int(size[1]), _MODES[self.options.mode]

    def _float(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, C] as float32 [n, C, H, W]: scaled to [0, 1] and normalised as the
        options say (per batch: only the uint8 pixels are kept)."""
        opts = self.options
        arr = (pixels.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        if opts.mean is not None:
            arr = arr - np.asarray(opts.mean, dtype=np.float32)[None, :, None, None]
        if opts.std is not None:
            arr = arr / np.asarray(opts.std, dtype=np.float32)[None, :, None, None]
        return np.ascontiguousarray(arr)

    def _store(self) -> tuple[np.ndarray, np.ndarray]:
        """The decoded pixels of this run, uint8 [N, H, W, C], in a memory-mapped temporary
        file that has no name (unlinked at creation: never reused by another run or process,
        gone when this reader or process ends, even on kill -9), and which rows it holds."""
        with self._lock:
            if self._pixels is None:
                self._pixels = scratch_array((len(self), *self.shape), np.uint8)
                self._have = np.zeros(len(self), dtype=bool)
            assert self._have is not None
            return self._pixels, self._have

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """uint8 pixels of rows ``start:stop``: decoded once per run (the first pass over a row
        decodes it; later passes read the decoded pixels)."""
        store, have = self._store()
        for i in np.flatnonzero(~have[start:stop]) + start:
            store[i] = self._load(int(i))
            have[i] = True
        return store[start:stop]

    def release(self) -> None:
        """Drop the decoded pixels already read from this process's resident memory (they
        stay in the temporary file): a pass keeps about one batch resident."""
        mm = getattr(self._pixels, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 [C, H, W], scaled and normalised as the options say."""
        return self._float(self.pixels(i, i + 1))[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.decode(i)), int(self.labels[i])

    def rows(self, start: int, stop: int) -> Raw:
        """Rows ``start:stop``, decoding only those images (once per run)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        x = self._float(self.pixels(start, stop))
        return Raw(x=x, y=self.labels[start:stop], ids=self.ids[start:stop])

    def batches(self, size: int, start: int, stop: int) -> Iterator[Raw]:
        """Rows ``start:stop`` in batches of ``size``, in order; the first pass decodes in
        worker processes (a torch DataLoader) when the range is large enough to pay for
        starting them, later passes read the pixels decoded then."""
        stop = min(stop, len(self))
        store, have = self._store()
        workers = 0 if have[start:stop].all() else loader_workers(stop - start)
        if workers == 0:
            for at in range(start, stop, size):
                yield self.rows(at, min(at + size, stop))
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(_Decoded(self), range(start, stop)),
            batch_size=size,
            shuffle=False,  # in order: a DataLoader returns batches in index order
            num_workers=workers,
            prefetch_factor=2,
            persistent_workers=False,
        )
        at = start
        for pixels in loader:
            n = len(pixels)
            store[at : at + n] = pixels.numpy()
            have[at : at + n] = True
            yield self.rows(at, at + n)
            at += n

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a worker process) without this run's decoded pixels."""
        return {k: v for k, v in self.__dict__.items() if k not in _RUN_ONLY}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pixels, self._have = threading.Lock(), None, None


_RUN_ONLY = ("_lock", "_pixels", "_have")


class _Decoded(torch.utils.data.Dataset):
    """The uint8 pixels of an image folder's rows, decoded from the files (for workers)."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.folder._load(i))


# Below this many images one process decodes. Measured on the 2-core dev machine (loaded):
# decoding (read, md5 check, PIL, scaling) takes about 0.8 ms per 32x32 PNG in one process,
# and a DataLoader worker costs about 0.25 s to start and hand over its first batch; at 2,048
# images that start is ~15% of the decoding the worker takes off the main process (which runs
# the model meanwhile), below ~300 images it costs more than it saves.
WORKER_MIN_ROWS = 2048


def loader_workers(n_rows: int) -> int:
    """Worker processes to decode ``n_rows`` images: none for small ranges or one core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if n_rows < WORKER_MIN_ROWS or (cores or 1) < 2:
        return 0
    return min(4, (cores or 1) - 1)
