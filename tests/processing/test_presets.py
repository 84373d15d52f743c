"""Presets: one record per transform; work is bounded by the output whatever the image's shape.

The arithmetic itself (processing/transform.py) is held to torchvision's in test_transform.py.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from resnext_hub.processing import ImageClassification, as_preset, load_image


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
