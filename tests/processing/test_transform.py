"""processing/transform.py, the one preprocessing implementation, against torchvision's transforms (the oracle).

The oracle is ``Resize(resize_size, interpolation, antialias=True)``, ``CenterCrop(crop_size)``,
``ToTensor()``, ``Normalize(mean, std)``: bit-exact on ordinary images; on extreme aspect ratios, where
only the cropped region is resampled, within the bound measured and stated in :data:`LEVELS`.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from awkward_images import awkward_images, picture
from conftest import IMAGES
from PIL import Image
from torchvision import transforms as T

from resnext_hub.processing import ImageClassification, load_image, transform
from resnext_hub.processing.presets import manifest_presets

MANIFEST = manifest_presets()
NVIDIA = MANIFEST["nvidia"]
# The manifest's presets, and the corners of the arithmetic: nearest, and a resize below the crop
# (CenterCrop pads with zeros; an odd difference, where its padding and its rounding disagree).
PRESETS = {
    **MANIFEST,
    "nearest": replace(NVIDIA, interpolation="nearest"),
    "pad": replace(NVIDIA, resize_size=200),
    "pad odd": replace(NVIDIA, resize_size=201, interpolation="bicubic"),
}
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
# Not extreme: the full resize; (256, 256) and (224, 224) are kept as they are by Resize's shortcut.
ORDINARY = [(1, 1), (7, 5), (224, 224), (256, 256), (300, 257), (257, 300), (255, 900), (1000, 260), (640, 480)]
# Extreme, but small enough for torchvision's full resize to stay cheap (1x60 becomes 256x15,360).
EXTREME = [(1, 60), (60, 1), (3, 150), (150, 4), (10, 300), (300, 7), (30, 500), (1200, 200), (400, 77)]
# Extreme shapes: at most this many levels of 255 between the resized crop and torchvision's, before
# normalization (measured on 1750 random shapes: 1 for bilinear, 2 for bicubic, the latter once). PIL
# rounds a resize box to float32, so the region's sampling positions differ from the full resize's in
# the last bits, and a pixel near a rounding boundary flips.
LEVELS = {"bilinear": 1, "bicubic": 2}
# Nearest picks a neighbouring source pixel instead (measured at most 0.45% of the crop's pixels).
NEAREST_FLIPS = 0.01


@cache
def _photos() -> tuple[Image.Image, ...]:
    return tuple(load_image(path) for path in PHOTOS)


def oracle(preset: ImageClassification) -> T.Compose:
    return T.Compose(
        [
            T.Resize(preset.resize_size, interpolation=T.InterpolationMode(preset.interpolation), antialias=True),
            T.CenterCrop(preset.crop_size),
            T.ToTensor(),
            T.Normalize(preset.mean, preset.std),
        ]
    )


def _levels(got: torch.Tensor, expected: torch.Tensor, preset: ImageClassification) -> torch.Tensor:
    """Per pixel, the largest difference across channels in levels of 255 (undoing Normalize's std)."""
    std = torch.tensor(preset.std)[:, None, None]
    return ((got - expected).abs() * std * 255).amax(0)


def _check_extreme(got: torch.Tensor, expected: torch.Tensor, preset: ImageClassification) -> None:
    levels = _levels(got, expected, preset)
    if preset.interpolation == "nearest":
        assert (levels > 1e-3).float().mean().item() <= NEAREST_FLIPS
    else:  # on noise, a region or grid off by a hundredth of a pixel is off by more somewhere
        assert levels.max().item() <= LEVELS[preset.interpolation] + 1e-3


def test_imports_only_pil_numpy_and_the_standard_library():
    """It runs inside Triton's Python backend, where torch and torchvision are absent."""
    tree = ast.parse(Path(transform.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module}: the file is shipped alone"
            imported.add(node.module.split(".")[0])
    assert {"PIL", "numpy"} <= imported
    assert imported - {"PIL", "numpy"} <= set(sys.stdlib_module_names), imported


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_ordinary_images_equal_torchvision_bit_for_bit(name):
    preset = PRESETS[name]
    reference = oracle(preset)
    images = [*_photos()]
    images += [picture(width, height, seed=i) for i, (width, height) in enumerate(ORDINARY)]
    for image in images:
        assert not transform.is_extreme(*image.size, preset.resize_size, preset.crop_size)
        got = preset(image)
        assert got.dtype == torch.float32 and got.shape == (3, preset.crop_size, preset.crop_size)
        assert got.is_contiguous()
        assert torch.equal(got, reference(image)), (name, image.size)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_extreme_shapes_are_within_the_stated_bound_of_torchvision(name):
    """The bounded path resamples only the cropped region, with the full resize's grid, filter and pass order."""
    preset = PRESETS[name]
    reference = oracle(preset)
    for i, (width, height) in enumerate(EXTREME):
        image = Image.fromarray(np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert transform.is_extreme(width, height, preset.resize_size, preset.crop_size)
        _check_extreme(preset(image), reference(image), preset)


def test_pixels_and_normalization_are_torchvisions():
    """Every 8-bit value, through ToTensor and Normalize, on a crop the size of the output."""
    values = np.arange(224 * 224 * 3, dtype=np.int64).reshape(224, 224, 3) % 256
    image = Image.fromarray(values.astype(np.uint8))
    expected = T.Normalize(NVIDIA.mean, NVIDIA.std)(T.ToTensor()(image))
    assert torch.equal(torch.from_numpy(transform.normalize(image, NVIDIA.as_dict())), expected)


@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_awkward_images_give_one_tensor_through_the_python_and_triton_paths(name):
    """The loader, then the preset (Python) or the function with preset.json's dict (the Triton backend)."""
    image = load_image(awkward_images()[name])
    assert image.mode == "RGB"
    shipped_preset = json.loads(json.dumps(NVIDIA.as_dict()))  # what the export writes as preset.json
    python = NVIDIA(image)
    triton = transform.preprocess(image, shipped_preset)
    assert triton.dtype == np.float32 and triton.flags.c_contiguous
    assert torch.equal(python, torch.from_numpy(triton))
    assert python.std() > 0.1  # the picture survived the mode, not a blank


SLOW_ORACLE = ("1x4000 PNG", "4000x1 PNG")  # torchvision resizes them to 256x1,024,000 (seconds, a GB)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ORACLE else n for n in sorted(awkward_images())]
)
def test_awkward_images_agree_with_torchvision(name):
    """torchvision on the loader's image: bit for bit, or within the bound for an extreme shape."""
    image = load_image(awkward_images()[name])
    got, expected = NVIDIA(image), oracle(NVIDIA)(image)
    if transform.is_extreme(*image.size, NVIDIA.resize_size, NVIDIA.crop_size):
        _check_extreme(got, expected, NVIDIA)
    else:
        assert torch.equal(got, expected)


def test_the_loader_reads_the_awkward_images_as_intended():
    """The cases are what their names say: upright EXIF, the GIF's first frame, alpha on white."""
    images = {name: load_image(data) for name, data in awkward_images().items()}
    assert images["EXIF orientation 6 JPEG"].size == images["EXIF orientation 8 JPEG"].size == (240, 320)
    assert images["1x4000 PNG"].size == (1, 4000) and images["4000x1 PNG"].size == (4000, 1)
    first = np.asarray(images["animated GIF"], dtype=np.int64)
    assert first[..., 2].mean() < 200 and first[..., 0].std() > 30  # not the blue second frame
    palette = np.asarray(images["palette PNG with transparency"])
    assert (palette == 255).all(axis=-1).any()  # the transparent entry shows the white background


def test_a_non_rgb_image_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="expected an RGB image .*load_image.*got mode 'L'"):
        transform.preprocess(Image.new("L", (8, 8)), NVIDIA.as_dict())
