"""A weights' preset applied with PIL and numpy only: equal to resnext_hub's ``ImageClassification``.

``preprocess(image, preset)`` gives the float32 array ``(3, crop, crop)`` that the preset gives as a
tensor (``resnext_hub.processing.ImageClassification.__call__``): the shorter side resized to
``resize_size`` with the preset's PIL filter (torchvision's ``Resize(int)`` arithmetic, which calls
PIL's ``resize`` for PIL images), the center crop (``CenterCrop``'s rounding), and for extreme aspect
ratios the same bounded path (only the region under the crop is resampled). Then ``/ 255`` and
``(x - mean) / std`` in float32, as ``ToTensor`` and ``Normalize`` compute them. ``preset`` is the
preset's dict (``ImageClassification.as_dict()``); imports nothing from resnext_hub, so it can be
shipped alone (it runs inside Triton's Python backend). The tests hold it equal to the preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

MAX_STRETCH = 4  # the preset's own threshold for the bounded path (processing/presets.py; a test keeps them equal)
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize_crop(image: Image.Image, preset: Mapping[str, Any]) -> Image.Image:
    """The resized center crop ``(crop_size, crop_size)`` of an RGB image."""
    resize, crop = int(preset["resize_size"]), int(preset["crop_size"])
    if resize < crop:
        raise ValueError(f"resize_size {resize} below crop_size {crop} would pad the crop; not supported")
    resample = RESAMPLE[preset["interpolation"]]
    width, height = image.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    if max(width, height) * resize > MAX_STRETCH * max(resize, crop) * min(width, height):
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        return image.resize((crop, crop), resample, box=box)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    return image.crop((left, top, left + crop, top + crop))


def normalize(image: Image.Image, preset: Mapping[str, Any]) -> np.ndarray:
    """``(3, H, W)`` float32: pixels / 255, minus mean, over std (per channel)."""
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(preset["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(preset["std"], dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((pixels - mean) / std)


def preprocess(image: Image.Image, preset: Mapping[str, Any]) -> np.ndarray:
    """The preset applied to an RGB image (what the loader returns)."""
    return normalize(resize_crop(image, preset), preset)
