"""A weights' preset applied to an image: the one implementation, in PIL and numpy only.

``preprocess(image, preset)`` gives the float32 array ``(3, crop, crop)`` of an RGB image, where
``preset`` is the preset's dict (``ImageClassification.as_dict()``, or ``preset.json`` in an exported
Triton repository). ``ImageClassification.__call__`` wraps it as a tensor; the Triton export ships this
file unchanged into the Python-backend preprocessing model, where torch is absent, so it imports only
PIL, numpy and the standard library (a test reads its imports).

The arithmetic is torchvision's ``Resize(resize_size)`` (antialiased; for PIL images torchvision calls
PIL's ``resize``), ``CenterCrop(crop_size)`` (its rounding, and its zero padding when the resized image
is smaller than the crop), ``ToTensor()`` and ``Normalize(mean, std)`` (``x / 255``, then
``(x - mean) / std``, in float32). The tests hold it bit-equal to those transforms on ordinary images.
For extreme aspect ratios only the source region under the crop is resampled (see
:func:`resize_crop`), so the work is bounded by the output whatever the image's shape; there the crop
is within 1 (bilinear) or 2 (bicubic) levels of 255 of torchvision's, before normalization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

MAX_STRETCH = 4  # resized long side, in multiples of the output, past which only the cropped region is resampled
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
_SUPPORT = {Image.BILINEAR: 1.0, Image.BICUBIC: 2.0}  # the filters' radius in source pixels, before scaling


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """``(width, height)`` after ``Resize(resize)``: the shorter side becomes ``resize``, the longer is truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_start(size: int, crop: int) -> int:
    """Where ``CenterCrop`` starts along a side of ``size`` pixels: negative where it pads (with zeros)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def is_extreme(width: int, height: int, resize: int, crop: int) -> bool:
    """Whether the full resize would be over :data:`MAX_STRETCH` times the output: then only the crop is resampled."""
    return max(width, height) * resize > MAX_STRETCH * max(resize, crop) * min(width, height)


def resize_crop(image: Image.Image, preset: Mapping[str, Any]) -> Image.Image:
    """The resized center crop ``(crop_size, crop_size)`` of an image.

    ``Resize`` scales the shorter side to ``resize_size``: a 1x5000 image would become
    256x1,280,000 pixels (gigabytes) before the crop keeps 224x224 of it. Past :data:`MAX_STRETCH`
    times the output, only the source region under the crop is resampled (PIL's ``resize(box=...)``:
    the full resize's sampling grid, filter and pass order, up to PIL's float32 rounding of the box).
    """
    resize, crop = int(preset["resize_size"]), int(preset["crop_size"])
    resample = RESAMPLE[preset["interpolation"]]
    width, height = image.size
    new_w, new_h = resized_size(width, height, resize)
    left, top = crop_start(new_w, crop), crop_start(new_h, crop)
    if is_extreme(width, height, resize, crop):
        return _resize_region(image, (new_w, new_h), (left, top), crop, resample)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    # PIL fills what lies outside the image with zeros: CenterCrop's padding.
    return image.crop((left, top, left + crop, top + crop))


def _resize_region(
    image: Image.Image, new_size: tuple[int, int], start: tuple[int, int], crop: int, resample: int
) -> Image.Image:
    """The part of the resized image that the crop keeps, resampled from that region of the source alone."""
    (new_w, new_h), (left, top) = new_size, start
    width, height = image.size
    x0, x1 = max(left, 0), min(left + crop, new_w)
    y0, y1 = max(top, 0), min(top + crop, new_h)
    sx, sy = width / new_w, height / new_h
    if resample == Image.NEAREST:  # one pass, no intermediate rounding
        return _pad(image.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)), start, crop)
    # The source pixels the filter reaches, with the box's coordinates relative to them (small floats: PIL
    # rounds a box to float32). Two single-axis passes, each rounded to 8 bits as in the full resize, in
    # its order: PIL shrinks a very tall image vertically first.
    c0, c1 = _reach(x0, x1, sx, width, resample)
    r0, r1 = _reach(y0, y1, sy, height, resample)
    source = image.crop((c0, r0, c1, r1))
    across = (x0 * sx - c0, x1 * sx - c0)
    down = (y0 * sy - r0, y1 * sy - r0)
    if height > 100 * width and new_h < height:
        columns = source.resize((c1 - c0, y1 - y0), resample, box=(0, down[0], c1 - c0, down[1]))
        region = columns.resize((x1 - x0, y1 - y0), resample, box=(across[0], 0, across[1], y1 - y0))
    else:
        rows = source.resize((x1 - x0, r1 - r0), resample, box=(across[0], 0, across[1], r1 - r0))
        region = rows.resize((x1 - x0, y1 - y0), resample, box=(0, down[0], x1 - x0, down[1]))
    return _pad(region, start, crop)


def _pad(region: Image.Image, start: tuple[int, int], crop: int) -> Image.Image:
    """``region`` (resized pixels from ``max(start, 0)``) in the crop: zeros around it, as ``CenterCrop`` pads."""
    if region.size == (crop, crop):
        return region
    padded = Image.new(region.mode, (crop, crop))
    padded.paste(region, (max(-start[0], 0), max(-start[1], 0)))
    return padded


def _reach(start: int, stop: int, scale: float, size: int, resample: int) -> tuple[int, int]:
    """The source pixels that outputs ``start..stop`` of a resize by ``1 / scale`` read (with a pixel to spare)."""
    support = _SUPPORT[resample] * max(scale, 1.0)
    return max(0, math.floor(start * scale - support) - 1), min(size, math.ceil(stop * scale + support) + 1)


def normalize(image: Image.Image, preset: Mapping[str, Any]) -> np.ndarray:
    """``(3, H, W)`` float32 of an RGB image: pixels / 255, minus mean, over std (per channel).

    The operations and their order are ``ToTensor``'s and ``Normalize``'s, so the values are theirs bit for bit.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (load_image converts any mode to RGB), got mode {image.mode!r}")
    # Channels first before the arithmetic: numpy is slow on a broadcast over a last axis of 3.
    values = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    values /= np.float32(255)
    values -= np.asarray(preset["mean"], dtype=np.float32).reshape(3, 1, 1)
    values /= np.asarray(preset["std"], dtype=np.float32).reshape(3, 1, 1)
    return values


def preprocess(image: Image.Image, preset: Mapping[str, Any]) -> np.ndarray:
    """The preset applied to an RGB image (what the loader returns): float32 ``(3, crop_size, crop_size)``."""
    return normalize(resize_crop(image, preset), preset)
