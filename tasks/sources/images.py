"""An image folder ``root/<class>/*.png|jpg|jpeg`` as a lazily decoded torch Dataset.

Class index = position of the class folder in the sorted folder names; ids = each file's path
relative to ``root`` (``cat/001.png``). Each image is decoded with Pillow to RGB (or L), resized
to ``data.image.size`` when set, scaled to [0, 1] and normalised with ``data.image.mean`` /
``std`` when set (no normalisation beyond /255 otherwise): float32 ``[C, H, W]``. Only file
names, sizes and digests are read when the folder is opened; pixels are decoded per row, so any
row range can be read without decoding the others.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from mirrorinf.errors import DataError
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
        for f, rel in sorted(zip(self.files, self.ids, strict=True), key=lambda t: t[1]):
            blob = f.read_bytes()  # read once: digest it, and the header gives the size
            h.update(f"{rel}\0{hashlib.md5(blob).hexdigest()}\n".encode())
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    sizes.setdefault(img.size, rel)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"{self.where}: cannot read image {rel}: {err}") from None
        return h.hexdigest(), sizes

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 [C, H, W], scaled and normalised as the options say."""
        from PIL import Image

        opts = self.options
        try:
            with Image.open(io.BytesIO(self.files[i].read_bytes())) as img:
                img = img.convert(opts.mode)
                if opts.size is not None:
                    img = img.resize((opts.size[1], opts.size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as err:  # truncated or corrupt after the header
            raise DataError(f"{self.where}: cannot decode image {self.ids[i]}: {err}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if opts.mean is not None:
            arr = arr - np.asarray(opts.mean, dtype=np.float32)[:, None, None]
        if opts.std is not None:
            arr = arr / np.asarray(opts.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray(arr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.decode(i)), int(self.labels[i])

    def rows(self, start: int, stop: int) -> Raw:
        """Rows ``start:stop``, decoding only those images."""
        idx = range(*slice(start, stop).indices(len(self)))
        first = self.decode(idx[0]) if len(idx) else np.zeros((0, 0, 0), np.float32)
        x = np.empty((len(idx), *first.shape), dtype=np.float32)
        for k, i in enumerate(idx):
            x[k] = first if k == 0 else self.decode(i)
        return Raw(x=x, y=self.labels[start:stop], ids=self.ids[start:stop])
