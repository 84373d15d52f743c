"""Preprocessing belongs to the weights: for timm's models our utilities give timm's own tensors.

The reference is timm's ``create_transform(**resolve_data_config(model=timm_model))`` (bicubic,
crop_pct 0.875 at 224; with ``use_test_size=True``, 288 and crop_pct 0.95) applied to the shared
photos opened with plain Pillow; ours is ``prepare_input_from_uri`` / ``prepare_batch`` with the
model (or its weights' test-size record) as ``preprocessing``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import hubconf
from resnext_hub.models import get_weights
from resnext_hub.processing import nvidia_convnets_processing_utils, prepare_batch, prepare_input_from_uri

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "images"
NAMES = ("seresnext26d_32x4d", "seresnext26t_32x4d", "seresnext50_32x4d")
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """Per name: (timm's model, ours), both untrained: only their preprocessing records matter."""
    found = {}
    for name in NAMES:
        with torch.device("meta"):  # no weights are needed, only the records attached to the models
            found[name] = (timm.create_model(name, pretrained=False), getattr(hubconf, name)(pretrained=False))
    return found


def _timm_tensors(timm_model: torch.nn.Module, *, use_test_size: bool = False) -> torch.Tensor:
    transform = create_transform(**resolve_data_config(model=timm_model, use_test_size=use_test_size))
    tensors = []
    for path in PHOTOS:
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors)


def test_photos_cover_modes_and_aspect_ratios():
    """The comparison runs on every shared photo: colour and grayscale, square and not."""
    modes, square = set(), set()
    for path in PHOTOS:
        with Image.open(path) as image:
            modes.add(image.mode)
            square.add(image.size[0] == image.size[1])
    assert len(PHOTOS) >= 5
    assert modes == {"RGB", "L"}
    assert square == {True, False}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_model_preprocessing_equals_timm_at_224(models, name):
    timm_model, ours = models[name]
    expected = _timm_tensors(timm_model)
    assert expected.shape == (len(PHOTOS), 3, 224, 224)
    single = torch.cat([prepare_input_from_uri(str(path), preprocessing=ours) for path in PHOTOS])
    batch = prepare_batch(PHOTOS, preprocessing=ours)
    utils_batch = nvidia_convnets_processing_utils(preprocessing=ours).prepare_batch(PHOTOS)
    for got in (single, batch, utils_batch):
        assert torch.equal(got, expected)
    # NVIDIA's default (bilinear) stays the default, and it is measurably not timm's.
    nvidia = torch.cat([prepare_input_from_uri(str(path)) for path in PHOTOS])
    assert (nvidia - expected).abs().max().item() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_weights_test_size_preprocessing_equals_timm_at_288(models, name):
    timm_model, _ = models[name]
    expected = _timm_tensors(timm_model, use_test_size=True)
    assert expected.shape == (len(PHOTOS), 3, 288, 288)
    test_preprocessing = get_weights(name).test_preprocessing
    assert test_preprocessing is not None
    got = prepare_batch(PHOTOS, preprocessing=test_preprocessing)
    assert torch.equal(got, expected)
    utils = nvidia_convnets_processing_utils(preprocessing=test_preprocessing)
    single = utils.prepare_input_from_uri(str(PHOTOS[0]))
    assert torch.equal(single[0], expected[0])
