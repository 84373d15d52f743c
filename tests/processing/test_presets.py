"""Presets: one record builds the transform; work is bounded by the output whatever the image's shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_hub.processing import ImageClassification, as_preset, load_image
from resnext_hub.processing.presets import manifest_presets

PRESETS = {name: preset for name, preset in manifest_presets().items()}


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", [(4, 1500), (1500, 4), (1, 900), (30, 1500), (1200, 200)])
def test_extreme_shapes_give_the_full_transform_result(name, size):
    """The bounded path resamples only the cropped region, with the full resize's grid and filter."""
    preset = PRESETS[name]
    image = _noise(*size)
    assert preset.extreme_crop(image) is not None
    full = preset.transform()(image)
    bounded = preset(image)
    assert bounded.shape == full.shape == (3, preset.crop_size, preset.crop_size)
    # A few levels of 255 at most (rounding of the box's float coordinates, bicubic overshoot).
    assert (full - bounded).abs().max().item() < 0.5
    assert (full - bounded).abs().mean().item() < 0.02  # a wrong region or grid gives ~1


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (1000, 260)])
def test_ordinary_photos_take_the_plain_transform(size):
    preset = as_preset(None)
    image = _noise(*size)
    assert preset.extreme_crop(image) is None
    assert torch.equal(preset(image), preset.transform()(image))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1, 60_000_000), (60_000_000, 1), (3, 20_000_000)])
def test_a_tiny_png_of_an_extreme_shape_costs_only_its_output(size):
    """A few-KB PNG, 1 pixel high and 60 M wide, once needed a 256 x 15 G resize (OverflowError or GBs)."""
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    assert len(data) < 200_000
    tensor = as_preset(None)(load_image(data))
    assert tensor.shape == (3, 224, 224) and torch.isfinite(tensor).all()


def test_record_validates_and_describes_itself():
    preset = ImageClassification.from_dict(
        {"resize_size": 320, "crop_size": 288, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    )
    assert preset.as_dict()["mean"] == [0.5, 0.5, 0.5]
    assert "288x288" in preset.describe() and "bicubic" in preset.describe()
    bad = [
        ({"resize_size": 0}, "resize_size must be a positive int"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"mean": [0.5, 0.5]}, "mean needs 3 values"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            ImageClassification.from_dict({**preset.as_dict(), **change})
    with pytest.raises(ValueError, match="missing"):
        ImageClassification.from_dict({"resize_size": 256})
    with pytest.raises(TypeError, match="preprocessing must be None"):
        as_preset({"resize_size": 256})
