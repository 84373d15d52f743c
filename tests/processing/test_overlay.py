"""Explanation overlays: the map lands on the part of the photo the model saw, at the photo's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_hub.processing.overlay import DIM_OUTSIDE, colormap, crop_box, overlay
from resnext_hub.processing.presets import ImageClassification
from resnext_hub.processing.transform import resize_crop

PRESET = ImageClassification(64, 56, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def marked(size: tuple[int, int]) -> Image.Image:
    """A photo with pixel values that say where they are (to find the crop's corners in the crop)."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    values = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.zeros_like(xs)], -1)
    return Image.fromarray(values.astype(np.uint8), "RGB")


@pytest.mark.parametrize("size", [(160, 100), (100, 160), (64, 64), (300, 64)])
def test_the_crop_box_is_the_region_the_preset_keeps(size):
    left, top, right, bottom = crop_box(size, PRESET)
    assert right - left == pytest.approx((bottom - top) * 1.0, abs=1.0)  # a square in the resized image
    # The preset's crop, read back: its corner pixels hold the photo's coordinates of the box's corners.
    crop = np.asarray(resize_crop(marked(size), PRESET.as_dict()), dtype=float)
    width, height = size
    assert crop[0, 0, 0] * (width - 1) / 255 == pytest.approx(left, abs=width / 32 + 2)
    assert crop[0, 0, 1] * (height - 1) / 255 == pytest.approx(top, abs=height / 32 + 2)
    assert crop[-1, -1, 0] * (width - 1) / 255 == pytest.approx(right, abs=width / 32 + 2)
    assert crop[-1, -1, 1] * (height - 1) / 255 == pytest.approx(bottom, abs=height / 32 + 2)


def test_a_small_photo_is_padded_by_the_crop_and_the_box_reaches_past_it():
    preset = ImageClassification(32, 48, "bilinear", (0.5,) * 3, (0.25,) * 3)
    left, top, right, bottom = crop_box((40, 32), preset)
    assert top < 0 and bottom > 32


def test_the_overlay_keeps_the_photos_shape_and_puts_the_heat_where_the_map_has_it():
    photo = Image.new("RGB", (200, 120), (128, 128, 128))
    heat = torch.zeros(4, 4)
    heat[0, 3] = 1.0  # the top-right cell of the crop
    out = overlay(photo, heat, PRESET, alpha=0.6)
    assert out.size == photo.size and out.mode == "RGB"
    pixels = np.asarray(out, dtype=int)
    left, top, right, bottom = crop_box(photo.size, PRESET)
    red = pixels[..., 0] - pixels[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert (left + right) / 2 < x + 0.5 < right and top <= y + 0.5 < (top + bottom) / 2  # pixel centres
    # Outside the crop the photo is darkened, not coloured.
    assert tuple(pixels[5, 2]) == (round(128 * DIM_OUTSIDE),) * 3
    assert tuple(pixels[5, 197]) == (round(128 * DIM_OUTSIDE),) * 3
    # Where the map is 0 the heat is the colormap's blue.
    cold = pixels[int(bottom) - 2, int(left) + 2]
    assert cold[2] > cold[0]


def test_colours_run_from_blue_to_red():
    low, high = colormap(np.array([0.0, 1.0]))
    assert low[2] > 0.4 and low[0] == 0 and high[0] > 0.4 and high[2] == 0


@pytest.mark.parametrize(("heat", "alpha", "message"), [(torch.zeros(2, 2, 2), 0.5, "one explanation map"),
                                                        (torch.zeros(2, 2), 1.5, "alpha")])  # fmt: skip
def test_bad_arguments_say_what_is_expected(heat, alpha, message):
    with pytest.raises(ValueError, match=message):
        overlay(Image.new("RGB", (10, 10)), heat, PRESET, alpha=alpha)
