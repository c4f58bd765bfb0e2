"""A decoded-image cache: each image file decoded and resized once, then read back as pixels.

Workers otherwise decode every JPEG again every epoch, and decoding is most of what a worker does for real
data. The cache keeps what the model's evaluation transform makes of the file in its first step, a
deterministic Resize (open_clip's: bicubic, shorter side to the model's size), so the rest of the transform
(centre crop, ToTensor, Normalize) gives the same tensor to the bit: Resize of an image already at that size
returns it as it is. It does not apply to random crops (`data.augment=true`), which need the original pixels.

One file per image under `<cache_dir>/decoded/<the Resize, Pillow's and torchvision's versions>/` (another
Pillow decodes a JPEG or resamples differently; another torchvision resizes differently), named by the file's
path, size and mtime (a changed file is decoded again), written to a temporary name and renamed, so workers and
ranks can fill it at once. A cached image carries the original size in `image.info["original_size"]`: boxes are
in the original pixels (`image_size`). A cache file that cannot be read is decoded and written again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torchvision
from PIL import Image
from torchvision import transforms as T

from datamodules.images import load_image, require_image_file

log = logging.getLogger(__name__)


def image_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image file: the cached image's original size, else its own."""
    return image.info.get("original_size", image.size)


def leading_resize(transform: Any) -> T.Resize | None:
    """The transform's first step if it is a Resize (a Compose that starts with one), else None."""
    steps = getattr(transform, "transforms", None)
    return steps[0] if steps and type(steps[0]) is T.Resize else None


class DecodedCache:
    """Images decoded and passed through `resize` once, kept as uint8 pixels under `folder`."""

    def __init__(self, cache_dir: str | Path, resize: T.Resize) -> None:
        self.resize = resize
        tag = (f"resize-{resize.size}-{resize.interpolation.value}-{resize.max_size}-{resize.antialias}"
               f"-pil{PIL.__version__}-tv{torchvision.__version__}")
        self.folder = Path(cache_dir) / "decoded" / "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        self.hits = self.misses = 0  # this process's (each worker counts its own)

    def path_of(self, file: Path) -> Path:
        stat = file.stat()
        key = hashlib.sha1(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, file: str | Path, where: str) -> Image.Image:
        """The resized image of `file` (a BadInput naming `where` if the file is missing or unreadable)."""
        file = require_image_file(file, where)
        cached = self.path_of(file)
        if cached.is_file():
            try:
                with np.load(cached) as saved:
                    image = Image.fromarray(saved["pixels"])
                    image.info["original_size"] = tuple(int(v) for v in saved["size"])
                self.hits += 1
                return image
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # a torn, empty or foreign file: decode again and replace it
        original = load_image(file, where)
        image = self.resize(original)
        self._write(cached, np.asarray(image, dtype=np.uint8), original.size)
        image.info["original_size"] = original.size
        self.misses += 1
        return image

    def _write(self, target: Path, pixels: np.ndarray, size: tuple[int, int]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, pixels=pixels, size=np.asarray(size, dtype=np.int64))
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash never leaves an empty file under the name
            os.replace(tmp, target)
        except OSError:  # a full disk leaves the cache as it was: the image is still returned
            Path(tmp).unlink(missing_ok=True)


def attach(source: Any, transform: Any, *, augment: bool) -> DecodedCache | None:
    """Give `source` a decoded-image cache for `transform` (data.image_cache=true). None, with a warning, for a
    source without one (the file sources have one; the shapes world draws its images); an error when the cache
    cannot be exact: random crops (augment) or a transform that does not start with a Resize."""
    if not hasattr(source, "decoded"):
        log.warning("data.image_cache: %s has no decoded-image cache (the shapes world draws its images); off",
                    type(source).__name__)
        return None
    if augment:
        raise ValueError("data.image_cache keeps images after the evaluation transform's Resize, but data.augment=true "
                         "crops the original pixels at random; set one of them to false")
    resize = leading_resize(transform)
    if resize is None:
        raise ValueError(f"data.image_cache needs a transform that starts with a Resize (open_clip's do); got {transform}")
    source.decoded = DecodedCache(source.cfg.cache_dir, resize)
    return source.decoded
