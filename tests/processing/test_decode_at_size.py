"""Decoding at the size the preset needs: JPEG at reduced DCT scale, other formats box-reduced, within a bound.

The photos are generated (tools/camera_photos.py: a bundled photo upscaled, with sensor-like
noise, JPEG quality 90) at 1008x756 against a preset resizing to 64: the same ratio as a 4032x3024
camera photo against NVIDIA's 256, at a sixteenth of the pixels.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import RGB_PHOTOS
from PIL import Image
from torchvision import transforms

from resnext_hub import processing
from resnext_hub.processing import ImageClassification, load_image
from resnext_hub.processing.images import decode, reduction
from tools.camera_photos import camera_photo

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PRESET = ImageClassification(64, 56, "bilinear", *IMAGENET)  # NVIDIA's 256/224, scaled by 1/4
SIZE = (1008, 756)  # 4032x3024 scaled by 1/4
# Bound on the final preprocessed tensor, in levels of 255, against the full decode. Measured here on
# bundled photos 0-4, upright and EXIF-turned: mean 0.23-0.43, max 2-5 (at camera size with NVIDIA's
# preset: mean 0.18-0.24, max 2-4; the upscaled photos carry more detail per pixel at this size).
MEAN_BOUND, MAX_BOUND = 0.5, 6.0


def levels(tensor: torch.Tensor, preset: ImageClassification = PRESET) -> torch.Tensor:
    """A preprocessed tensor back in levels of 255 (undoing the normalization)."""
    mean = torch.tensor(preset.mean)[:, None, None]
    std = torch.tensor(preset.std)[:, None, None]
    return (tensor * std + mean) * 255


def difference(full: Image.Image, fast: Image.Image) -> tuple[float, float]:
    """Mean and max absolute difference of the two images' preprocessed tensors, in levels of 255."""
    diff = (levels(PRESET(full)) - levels(PRESET(fast))).abs()
    return diff.mean().item(), diff.max().item()


@pytest.mark.parametrize(("index", "orientation"), [(0, None), (1, 6), (3, 3)])
def test_a_large_jpeg_decodes_at_a_quarter_within_the_bound(index, orientation):
    data = camera_photo(index, SIZE, orientation=orientation)
    full = load_image(data)
    fast = load_image(data, min_size=PRESET.resize_size)
    # Short side 756 >= 2 * 64 * 4: DCT scale 1/4 (1/8 would leave 95 < 128), in the oriented frame.
    assert full.size == ((756, 1008) if orientation == 6 else SIZE)
    assert fast.size == (full.size[0] // 4, full.size[1] // 4) and fast.mode == "RGB"
    mean, most = difference(full, fast)
    assert mean <= MEAN_BOUND and most <= MAX_BOUND, (mean, most)


def test_the_orientation_is_applied_to_the_reduced_image():
    upright = load_image(camera_photo(2, SIZE), min_size=64)
    turned = load_image(camera_photo(2, SIZE, orientation=3), min_size=64)  # stored as is, viewed turned 180
    assert turned.size == upright.size
    assert torch.equal(PRESET(turned), PRESET(upright.transpose(Image.ROTATE_180)))


def test_other_formats_are_box_reduced_within_the_bound():
    photo = Image.open(io.BytesIO(camera_photo(4, SIZE)))
    png = io.BytesIO()
    photo.save(png, "PNG", compress_level=0)
    full = load_image(png.getvalue())
    fast = load_image(png.getvalue(), min_size=64)
    assert reduction(full.size, 64) == 4 and fast.size == (252, 189)  # 5 does not divide 1008
    mean, most = difference(full, fast)
    assert mean <= MEAN_BOUND and most <= MAX_BOUND, (mean, most)


def test_modes_with_alpha_are_made_rgb_first():
    rgba = Image.new("RGBA", (600, 520), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 300, 520))
    encoded = io.BytesIO()
    rgba.save(encoded, "PNG")
    fast = load_image(encoded.getvalue(), min_size=64)
    assert fast.mode == "RGB" and fast.size == (150, 130)
    assert fast.getpixel((10, 10)) == (200, 10, 10) and fast.getpixel((140, 10)) == processing.BACKGROUND


@pytest.mark.parametrize(
    ("size", "draft", "reduced"),
    [
        ((133, 100), (133, 100), (133, 100)),  # smaller than twice the target
        ((340, 255), (340, 255), (340, 255)),  # a factor of 2 would go below 128
        ((341, 256), (341, 256), (341, 256)),  # 2 does not divide 341: never a partial block
        ((344, 258), (172, 129), (172, 129)),  # DCT scale 1/2
        ((1400, 1050), (700, 525), (700, 525)),  # 1/2 (4 does not divide 1050); no factor of 700x525 up to 4
        ((1024, 1536), (128, 192), (128, 192)),  # 1/8 leaves 128 exactly
        ((960, 1440), (240, 360), (240, 360)),  # 1/4 (1/8 would leave 120)
        ((4032, 3024), (504, 378), (252, 189)),  # 1/8 (a camera photo at this target), then 2
    ],
)
def test_the_reduction_divides_both_sides_and_keeps_twice_the_target(size, draft, reduced):
    encoded = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(encoded, "JPEG", quality=90)
    assert decode(encoded.getvalue(), min_size=64).size == draft
    assert load_image(encoded.getvalue(), min_size=64).size == reduced


def test_small_photos_and_no_target_are_the_full_decode_bit_for_bit():
    for photo in RGB_PHOTOS:
        assert torch.equal(PRESET(load_image(photo, min_size=256)), PRESET(load_image(photo)))
    pil = Image.open(io.BytesIO(camera_photo(0, SIZE)))
    assert load_image(pil).size == SIZE and load_image(pil, min_size=64).size == (252, 189)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256"])
def test_a_target_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(ValueError, match="min_size must be None or a positive int"):
        load_image(RGB_PHOTOS[0], min_size=bad)


def test_nvidia_utilities_decode_every_pixel(tmp_path):
    """NVIDIA's calls are the compatibility promise: bit-exact, never the reduced decode."""
    path = tmp_path / "large.jpg"
    path.write_bytes(camera_photo(1, (1400, 1050)))  # 1050 >= 4 * 256: NVIDIA's preset could reduce it by 2
    nvidia = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    expected = nvidia(Image.open(path)).unsqueeze(0).sub_(mean).div_(std)
    assert torch.equal(processing.prepare_input_from_uri(str(path)), expected)
    assert torch.equal(processing.prepare_batch([str(path)]), expected)
    utils = processing.nvidia_convnets_processing_utils()
    assert torch.equal(utils.prepare_input_from_uri(str(path)), expected)
    assert utils.load_image(str(path)).size == (1400, 1050)
    # The reduced decode would have differed: this test can tell the two apart.
    reduced = processing.as_preset(None)(load_image(str(path), min_size=256))[None]
    assert not torch.equal(reduced, expected)
