"""Awkward but valid encoded images, generated with PIL: each is a case the loader and the transform must handle.

Shared by the preprocessing tests (tests/processing/test_transform.py) and the Triton ones
(tests/resnext_hub/test_triton_backend.py): the same bytes through the Python path and through the Triton backend.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with no symmetry (gradients, so rotations are told apart) and some texture (noise)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    noise = np.random.default_rng(seed).normal(0, 12, (height, width, 3))
    values = np.stack([x, y, 255 - (x + y) / 2], axis=-1) + noise
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _palette_with_transparency(rgb: Image.Image) -> bytes:
    palette = rgb.quantize(64)
    return encode(palette, "PNG", transparency=0)  # palette entry 0 is see-through: composited on white


def _animated_gif(rgb: Image.Image) -> bytes:
    second = Image.new("RGB", rgb.size, (0, 0, 255))
    return encode(rgb, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


@cache
def awkward_images() -> dict[str, bytes]:
    """Name -> encoded bytes (320x240 unless the name says otherwise)."""
    rgb = picture(320, 240)
    gray = np.asarray(rgb.convert("L"), dtype=np.uint16)
    alpha = Image.linear_gradient("L").resize(rgb.size)
    return {
        "CMYK JPEG": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "16-bit grayscale PNG": encode(Image.fromarray(gray * 257 + 128), "PNG"),
        "palette PNG with transparency": _palette_with_transparency(rgb),
        "EXIF orientation 6 JPEG": encode(rgb, "JPEG", quality=95, exif=_exif(6)),
        "EXIF orientation 8 JPEG": encode(rgb, "JPEG", quality=95, exif=_exif(8)),
        "LA PNG": encode(Image.merge("LA", (rgb.convert("L"), alpha)), "PNG"),
        "1-bit PNG": encode(rgb.convert("1"), "PNG"),
        "1x4000 PNG": encode(picture(1, 4000), "PNG"),
        "4000x1 PNG": encode(picture(4000, 1), "PNG"),
        "animated GIF": _animated_gif(rgb),
    }
