"""Fuzzing the image loader: random and mutated bytes give an RGB image or InvalidImageError,
never another exception, and never take long.

Seeds are small real images of every allowed format; mutations flip, overwrite, insert,
delete and truncate bytes, and overwrite header fields with extreme integers.
"""

from __future__ import annotations

import io
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from resnext_hub.processing import InvalidImageError, load_image

# Hypothesis keeps caches under ./.hypothesis by default: keep them out of the repo.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "resnext-hub-hypothesis")

# Each decode of these 24x16 seeds takes well under a millisecond; a mutated header may still
# claim up to MAX_PIXELS, so one example is allowed this long.
SLOWEST_EXAMPLE_S = 2.0
FUZZ = settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)
# Mutations of real files reach deepest into the decoders: most of the budget goes there.
FUZZ_MUTATED = settings(FUZZ, max_examples=1500)


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    out = {}
    for name, image, fmt, kwargs in [
        ("jpeg", rgb, "JPEG", {"quality": 80}),
        ("progressive-jpeg", rgb, "JPEG", {"progressive": True}),
        ("png", rgba, "PNG", {}),
        ("png-palette", rgb.convert("P"), "PNG", {}),
        ("png-16bit", Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24) * 170), "PNG", {}),
        ("gif", rgb.convert("P"), "GIF", {}),
        ("bmp", rgb, "BMP", {}),
        ("tiff", rgb, "TIFF", {}),
        ("tiff-lzw", rgb, "TIFF", {"compression": "tiff_lzw"}),
        ("webp", rgb, "WEBP", {"quality": 80}),
        ("webp-lossless", rgba, "WEBP", {"lossless": True}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        out[name] = buffer.getvalue()
    return out


SEEDS = _seeds()

# Pillow warns about broken EXIF blocks and short reads; with warnings turned into errors
# (as strict users run), still nothing but InvalidImageError may escape.
pytestmark = pytest.mark.filterwarnings("error")


def _check(data: bytes) -> str:
    """Load ``data``; only the documented outcomes are allowed. Returns which one happened."""
    started = time.perf_counter()
    try:
        image = load_image(data)
    except InvalidImageError as error:
        assert isinstance(error, ValueError)
        assert error.uri == "<bytes>" and error.reason
        outcome = "refused"
    else:
        assert image.mode == "RGB"
        assert image.width >= 1 and image.height >= 1
        outcome = "decoded"
    elapsed = time.perf_counter() - started
    assert elapsed < SLOWEST_EXAMPLE_S, f"{elapsed:.2f} s for {len(data)} bytes starting {data[:16]!r}"
    return outcome


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "integer"]))
        # Headers are where parsers go wrong: bias positions toward the first 64 bytes.
        limit = min(len(data) - 1, draw(st.sampled_from([63, len(data) - 1])))
        if limit < 0:
            break
        at = draw(st.integers(0, limit))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # an extreme size or offset field
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
    return bytes(data)


def test_seeds_decode():
    assert {name: _check(data) for name, data in SEEDS.items()} == dict.fromkeys(SEEDS, "decoded")


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(data):
    _check(data)


@pytest.mark.slow
@FUZZ
@given(
    magic=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]),
    rest=st.binary(max_size=2048),
)
def test_random_bytes_behind_a_real_magic_number(magic, rest):
    _check(magic + rest)


@pytest.mark.slow
@FUZZ_MUTATED
@given(data=mutated())
def test_mutated_images(data):
    _check(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_truncation_of_every_seed(name):
    data = SEEDS[name]
    step = max(1, len(data) // 97)
    outcomes = [_check(data[:end]) for end in range(0, len(data), step)]
    assert outcomes[0] == "refused"  # the empty prefix
    assert "refused" in outcomes
