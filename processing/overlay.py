"""An explanation map drawn over the photo it explains: a heatmap where the model looked, the photo's shape kept.

A model sees the preset's center crop of the photo (shorter side resized to ``resize_size``, then
``crop_size`` x ``crop_size`` from the middle), so a map ``(H, W)`` (``resnext_hub.models.explain``)
covers that square only. :func:`overlay` returns an image of the photo's own size and aspect ratio: inside
the crop, the map bilinearly upsampled, coloured (blue: none of the class's evidence, red: the most) and
blended over the photo; outside it, the photo darkened, because the model never saw that part.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .presets import as_preset
from .transform import crop_start, resized_size

DIM_OUTSIDE = 0.45  # brightness kept outside the crop


def crop_box(size: tuple[int, int], preprocessing: Any = None) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of the region of a photo of ``size`` (width, height) that the preset's center
    crop shows the model, in the photo's pixels (beyond its edges where the crop pads a small photo).

    ``preprocessing``: a preset, or a model or weights record carrying one (None: NVIDIA's).
    """
    preset = as_preset(preprocessing)
    width, height = size
    new_w, new_h = resized_size(width, height, preset.resize_size)
    left, top = crop_start(new_w, preset.crop_size), crop_start(new_h, preset.crop_size)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + preset.crop_size) * sx, (top + preset.crop_size) * sy


def colormap(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] -> RGB floats in [0, 1] (the "jet" colours: blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def _interpolation(coords: np.ndarray, cells: int) -> np.ndarray:
    """Linear interpolation weights ``(len(coords), cells)`` of positions given in cell units (centres at 0..n-1)."""
    coords = np.clip(coords, 0.0, cells - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    frac = coords - low
    weights = np.zeros((len(coords), cells))
    rows = np.arange(len(coords))
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample(heat: Any, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """A map ``(H, W)`` spread bilinearly over ``box`` of an image of ``size`` (width, height): ``(height, width)``
    floats, NaN outside the box."""
    heat = np.asarray(heat.detach().float().cpu() if hasattr(heat, "detach") else heat, dtype=np.float64)
    if heat.ndim != 2 or 0 in heat.shape:
        raise ValueError(f"expected one explanation map (H, W), got shape {heat.shape}")
    (width, height), (left, top, right, bottom) = size, box
    cells_y, cells_x = heat.shape
    centres_x, centres_y = np.arange(width) + 0.5, np.arange(height) + 0.5
    across = _interpolation((centres_x - left) / (right - left) * cells_x - 0.5, cells_x)
    down = _interpolation((centres_y - top) / (bottom - top) * cells_y - 0.5, cells_y)
    spread = down @ heat @ across.T
    inside = ((centres_y >= top) & (centres_y < bottom))[:, None] & ((centres_x >= left) & (centres_x < right))[None]
    return np.where(inside, spread, np.nan)


def overlay(photo: Image.Image, heat: Any, preprocessing: Any = None, *, alpha: float = 0.5) -> Image.Image:
    """``photo`` (any mode) with the explanation map ``heat`` (``(H, W)`` in [0, 1], a tensor or array) blended over
    the part the model saw: an RGB image of the photo's size (see the module's docstring).

    ``preprocessing``: the preset the model's input was made with (a preset, a model or a weights record;
    None: NVIDIA's); ``alpha``: the heatmap's weight in the blend.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    rgb = np.asarray(photo.convert("RGB"), dtype=np.float64) / 255.0
    spread = upsample(heat, photo.size, crop_box(photo.size, preprocessing))
    inside = ~np.isnan(spread)[..., None]
    blended = (1.0 - alpha) * rgb + alpha * colormap(np.nan_to_num(spread))
    out = np.where(inside, blended, DIM_OUTSIDE * rgb)
    return Image.fromarray(np.round(out * 255.0).astype(np.uint8), "RGB")
