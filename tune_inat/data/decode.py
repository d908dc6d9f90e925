"""Decode one image file into the cache's square RGB uint8 form. Pillow and NumPy only.

The stored form: EXIF orientation applied, converted to 8-bit RGB, the centred square of
side min(width, height) kept and resized to `stored_size` x `stored_size`. With
`stored_size = image_size * 8 / 7` (256 for 224) the centre `image_size` crop of the stored
square is exactly the classic "resize 256, centre crop 224" evaluation view, and training
crops are sampled from the whole square.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EVAL_CROP_FRACTION = 7 / 8  # image_size / stored_size, as in "resize 256, crop 224"
WHITE = (255, 255, 255)


def stored_size_for(image_size: int) -> int:
    """Side of the cached square for a given training resolution (always >= image_size)."""
    return max(image_size, int(math.ceil(image_size / EVAL_CROP_FRACTION)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16/32-bit and float scaled, transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range -> 8-bit
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: Path, stored_size: int) -> np.ndarray:
    """Read `path` and return its (stored_size, stored_size, 3) uint8 square. Raises on bad files."""
    with Image.open(path) as image:
        image.draft("RGB", (stored_size, stored_size))  # JPEG: decode at reduced scale, still >= size
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.resize(
            (stored_size, stored_size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + side, top + side),
            reducing_gap=2.0,
        )
        array = np.asarray(square, dtype=np.uint8)
    if array.shape != (stored_size, stored_size, 3):
        raise ValueError(f"decoded to shape {array.shape}")
    return array
