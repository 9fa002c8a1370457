"""Test images decoded once for evaluation: uint8 ``[n, 3, px, px]``, shorter side resized to the model's size
(bicubic) and centre-cropped, as open_clip's eval transform does. What classifies them is the run kind's head
(clipgen.models.zeroshot for CLIP), applied per checkpoint by clipgen.eval.run.evaluate_checkpoint.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from clipgen.errors import ClipgenError


# --- images --------------------------------------------------------------------------------------------------
def load_image(path: str, image_px: int) -> np.ndarray:
    """One image as uint8 ``[3, px, px]``: RGB, shorter side resized to ``image_px`` (bicubic), centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = image_px / min(w, h)
            # Resize the shorter side exactly to image_px (rounding could leave it one pixel short).
            size = (image_px, max(image_px, round(h * scale))) if w <= h else (max(image_px, round(w * scale)),
                                                                              image_px)
            if (w, h) != size:
                im = im.resize(size, Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_px) // 2, (h - image_px) // 2
            im = im.crop((left, top, left + image_px, top + image_px))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e}): expected a readable PNG/JPEG file") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_images(paths: Sequence[str], image_px: int, out: np.ndarray | None = None,
                  workers: int | None = None) -> np.ndarray:
    """Decode ``paths`` into uint8 ``[n, 3, px, px]`` (into ``out`` if given, e.g. a disk-backed memmap for
    test sets that do not fit in memory). PIL releases the GIL while decoding and resizing, so threads help."""
    n = len(paths)
    if out is None:
        out = np.empty((n, 3, image_px, image_px), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)

    def _one(i: int) -> None:
        out[i] = load_image(paths[i], image_px)

    if workers <= 1 or n < 64:
        for i in range(n):
            _one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_one, range(n)))  # list() re-raises the first worker error
    return out
