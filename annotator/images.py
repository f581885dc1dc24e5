"""PNG bytes of pool items, encoded from the in-memory dataset (never read from a client-chosen path)."""
from __future__ import annotations

import io
import math
import threading

import numpy as np
import torch
from PIL import Image

DISPLAY_SIDE = 256  # pixels: small images are upscaled (nearest neighbour) to at least this side
CACHE_ITEMS = 4096  # PNGs kept in memory; a batch and its neighbours fit many times over


def image_to_png(image: torch.Tensor, display_side: int = DISPLAY_SIDE) -> bytes:
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
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # speed over size: served on loopback/LAN
    return buffer.getvalue()


_CACHE_LOCK = threading.Lock()  # request threads share the cache


def item_png(cache: dict, images: torch.Tensor, item_id: int) -> bytes:
    """PNG of pool item `item_id`, from a bounded cache (encoded outside the lock)."""
    png = cache.get(item_id)
    if png is None:
        png = image_to_png(images[item_id])
        with _CACHE_LOCK:
            while len(cache) >= CACHE_ITEMS:
                cache.pop(next(iter(cache)))  # drop the oldest (dicts keep insertion order)
            cache[item_id] = png
    return png
