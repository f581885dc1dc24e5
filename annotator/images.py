"""The pictures people label: the original file as it is (upright, aspect kept), or a crisp upscale of a
benchmark's small images. Never read from a path the client names: an item id is looked up in the
run's own dataset, whose files lie under its data folder.

- Image folders: the original file, turned upright by its EXIF orientation, downscaled only when its
  longest side exceeds MAX_SIDE; JPEG files are served as JPEG (quality 90), everything else as PNG
  (transparency kept). If the file has vanished or become unreadable since the pool was built, the
  model-size pixels of the cache are shown instead, so a page never breaks.
- Benchmark datasets (28x28 digits, 32x32 CIFAR): the pixels upscaled by a whole factor, nearest
  neighbour, so they stay sharp.

Encoded pictures are kept in a cache bounded in bytes (least recently used out first).
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from al_engine.data import Dataset

DISPLAY_SIDE = 256  # pixels: small benchmark images are upscaled (nearest neighbour) to at least this side
MAX_SIDE = 2048  # pixels: originals whose longest side is larger are downscaled for the browser
JPEG_QUALITY = 90
CACHE_BYTES = 128 * 1024 * 1024  # encoded pictures kept in memory, in bytes
EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the picture by 90 degrees (width and height swap)


@dataclass
class Picture:
    """An encoded picture and what the page shows about it."""

    data: bytes
    mimetype: str  # image/jpeg or image/png
    width: int  # of the original, upright, in pixels
    height: int
    name: str | None  # the file's path relative to the data folder; None for benchmark datasets


class PictureCache:
    """Encoded pictures by item id, bounded in bytes; safe across request threads."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.size = 0  # bytes held
        self._items: OrderedDict[int, Picture] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item_id: int) -> Picture | None:
        with self._lock:
            picture = self._items.get(item_id)
            if picture is not None:
                self._items.move_to_end(item_id)
            return picture

    def put(self, item_id: int, picture: Picture) -> None:
        if len(picture.data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(item_id, None)
            if old is not None:
                self.size -= len(old.data)
            self._items[item_id] = picture
            self.size += len(picture.data)
            while self.size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped.data)

    def __len__(self) -> int:
        return len(self._items)


def upscaled_png(image: torch.Tensor, display_side: int = DISPLAY_SIDE) -> bytes:
    """(C, H, W) uint8 -> PNG bytes, upscaled by a whole factor so pixels stay sharp."""
    array = image.cpu().numpy()
    channels, height, width = array.shape
    scale = max(1, math.ceil(display_side / max(height, width)))
    if channels == 1:
        picture = Image.fromarray(array[0], mode="L")
    else:
        picture = Image.fromarray(np.ascontiguousarray(array[:3].transpose(1, 2, 0)), mode="RGB")
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    return _encode(picture, "PNG")


def _encode(picture: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "JPEG":
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format="PNG", compress_level=1)  # speed over size: served on loopback or a LAN
    return buffer.getvalue()


def original_picture(path: Path, name: str | None = None) -> Picture:
    """The file's picture, upright, aspect kept, downscaled only past MAX_SIDE. Raises OSError (or
    ValueError, Pillow's decompression-bomb errors) when it cannot be read."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            kind = "JPEG" if opened.format == "JPEG" else "PNG"
            picture = ImageOps.exif_transpose(opened)  # a copy, upright
    width, height = picture.size
    if max(width, height) > MAX_SIDE:
        picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    if kind == "JPEG":
        picture = picture.convert("RGB") if picture.mode not in ("RGB", "L") else picture
    elif picture.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = picture.mode in ("P", "PA") and "transparency" in picture.info or "A" in picture.mode
        picture = picture.convert("RGBA" if has_alpha else "RGB")
    return Picture(_encode(picture, kind), f"image/{kind.lower()}", width, height, name)


def file_of(images: Dataset, position: int) -> tuple[Path, str] | None:
    """(path, name relative to the data folder) of a pool item's original file, or None (benchmarks)."""
    if images.file_names is None or images.data_root is None:
        return None
    name = images.file_names[position]
    return Path(images.data_root) / name, name


def item_picture(images: Dataset, position: int) -> Picture:
    """What the browser shows for the pool item at `position` (see the module docstring)."""
    found = file_of(images, position)
    pixels = images.train_images[position]
    if found is not None:
        path, name = found
        try:
            return original_picture(path, name)
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            side = int(pixels.shape[-1])  # the file changed under the pool: its cached model-size pixels
            return Picture(upscaled_png(pixels), "image/png", side, side, name)
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    return Picture(upscaled_png(pixels), "image/png", width, height, None)


def cached_picture(cache: PictureCache, images: Dataset, item_id: int, position: int | None = None) -> Picture:
    """`item_picture` of the item (at pool `position`, default the id itself) through the cache, keyed by
    the item id (encoded outside any lock)."""
    picture = cache.get(item_id)
    if picture is None:
        picture = item_picture(images, item_id if position is None else position)
        cache.put(item_id, picture)
    return picture


def picture_info(images: Dataset, position: int | None) -> dict:
    """{"name", "width", "height"} of a pool item without decoding it (the file's header only)."""
    if position is None:  # not in the pool (its file vanished)
        return {"name": None, "width": None, "height": None}
    found = file_of(images, position)
    if found is None:
        pixels = images.train_images[position]
        return {"name": None, "width": int(pixels.shape[-1]), "height": int(pixels.shape[-2])}
    path, name = found
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, ValueError, Image.DecompressionBombError):
        width = height = None
    return {"name": name, "width": width, "height": height}
