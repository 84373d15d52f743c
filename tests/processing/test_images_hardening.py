"""Bad images and bad servers: every failure is an InvalidImageError naming the URI and the
reason, nothing hangs past its deadline, and every image mode gives a finite tensor.

Servers are real sockets on 127.0.0.1 (tests/rawserver.py); images are real files.
"""

from __future__ import annotations

import gzip
import io
import re
import resource
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rawserver import RawServer, drip, endless, reply, stall

from resnext_hub.processing import InvalidImageError, load_image, prepare_batch, prepare_input_from_uri
from resnext_hub.processing.images import MAX_BYTES_ENV, MAX_PIXELS_ENV, decode

DEADLINE_S = 1.0
# The deadline plus the slack of a loaded 2-core CI machine.
MAX_WAIT_S = DEADLINE_S + 1.5


def _gradient(size: tuple[int, int] = (48, 32)) -> np.ndarray:
    """An RGB test picture with no symmetry (so rotations are told apart)."""
    w, h = size
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# --- every mode -------------------------------------------------------------------------------


def _mode_images() -> dict[str, tuple[Image.Image, str]]:
    rgb = Image.fromarray(_gradient())
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette_t = rgb.convert("P")
    palette_t.info["transparency"] = 0
    i16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    i32 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257)
    return {
        "1": (rgb.convert("1"), "PNG"),
        "L": (rgb.convert("L"), "PNG"),
        "LA": (rgba.convert("LA"), "PNG"),
        "P": (rgb.convert("P"), "PNG"),
        "P-transparency": (palette_t, "PNG"),
        "P-gif-transparency": (palette_t, "GIF"),
        "RGB": (rgb, "PNG"),
        "RGBA": (rgba, "PNG"),
        "RGBA-webp": (rgba, "WEBP"),
        "CMYK": (rgb.convert("CMYK"), "JPEG"),
        "CMYK-tiff": (rgb.convert("CMYK"), "TIFF"),
        "I;16": (i16, "PNG"),
        "I;16-tiff": (i16, "TIFF"),
        "I": (i32, "TIFF"),
        "F": (Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255), "TIFF"),
        "YCbCr": (rgb.convert("YCbCr"), "JPEG"),
        "BMP": (rgb, "BMP"),
    }


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("name", sorted(MODE_IMAGES))
def test_every_mode_gives_a_finite_rgb_tensor(name, tmp_path):
    image, fmt = MODE_IMAGES[name]
    path = tmp_path / f"{name.replace(';', '_')}.{fmt.lower()}"
    image.save(path, fmt)
    tensor = prepare_input_from_uri(str(path))
    assert tensor.shape == (1, 3, 224, 224)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    # Not a blank: the picture's gradient survives whatever the mode.
    assert tensor.std() > 0.1


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    gray_clear = Image.new("LA", (8, 8), (0, 0))
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 3
    assert load_image(_png(clear)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(gray_clear)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(palette, transparency=3)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(half)).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    loaded = load_image(_encode(Image.fromarray(values), fmt))
    assert np.asarray(loaded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_rotate_90_gives_the_upright_photo():
    upright = Image.fromarray(_gradient((64, 40)))
    # Orientation 6: "rotate 90 clockwise to display", so the sensor stored it 90 degrees counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged_png = _encode(stored, "PNG", exif=exif.tobytes())
    assert np.array_equal(np.asarray(load_image(tagged_png)), np.asarray(upright))
    tagged_jpeg = _encode(stored, "JPEG", quality=98, exif=exif.tobytes())
    want = prepare_input_from_uri(_encode(upright, "JPEG", quality=98))
    got = prepare_input_from_uri(tagged_jpeg)
    untransposed = prepare_input_from_uri(_encode(stored, "JPEG", quality=98))
    assert (got - want).abs().mean() < 0.02
    assert (untransposed - want).abs().mean() > 0.3


# --- bad files --------------------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the error's reason must contain)."""
    photo = _encode(Image.fromarray(_gradient((256, 256))), "JPEG")
    png = _png(Image.fromarray(_gradient((256, 256))))
    files = {
        "missing": (b"", "no such file"),
        "empty": (b"", "empty"),
        "truncated-jpeg": (photo[: len(photo) // 2], "truncated"),
        "truncated-png": (png[: len(png) // 2], "truncated"),
        "header-only-png": (png[:40], "truncated"),
        "html-as-jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image"),
        "text": (b"just some text\n" * 20, "not an image"),
        "ppm": (_encode(Image.fromarray(_gradient()), "PPM"), "not one of"),
        "ico": (_encode(Image.fromarray(_gradient((32, 32))), "ICO"), "not one of"),
        "tga": (_encode(Image.fromarray(_gradient()), "TGA"), "not one of"),
        "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not an image"),
    }
    out = {}
    for name, (data, reason) in files.items():
        path = folder / f"{name}.jpg"
        if name != "missing":
            path.write_bytes(data)
        out[name] = (path, reason)
    (folder / "a-folder.jpg").mkdir()
    out["directory"] = (folder / "a-folder.jpg", "not a regular file")
    return out


BAD_FILE_NAMES = [
    "missing",
    "empty",
    "truncated-jpeg",
    "truncated-png",
    "header-only-png",
    "html-as-jpg",
    "text",
    "ppm",
    "ico",
    "tga",
    "pdf",
    "directory",
]


@pytest.mark.parametrize("name", BAD_FILE_NAMES)
def test_bad_files_raise_the_documented_error(name, tmp_path):
    path, reason = _bad_files(tmp_path)[name]
    with pytest.raises(InvalidImageError) as caught:
        prepare_input_from_uri(str(path))
    assert isinstance(caught.value, ValueError)
    assert caught.value.uri == str(path)
    assert str(path) in str(caught.value)
    assert reason in caught.value.reason


def test_batch_helper_names_the_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_gradient()).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>oops</html>")
    assert prepare_batch([good, good]).shape == (2, 3, 224, 224)
    with pytest.raises(InvalidImageError, match="bad.jpg: not an image"):
        prepare_batch([good, bad])


# --- decompression bombs ----------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A few-KB PNG whose header claims ``width`` x ``height`` RGB pixels (a few real rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 2, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its frame header's size patched."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (4, 4), "red"), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


BOMBS = {
    "png-40000x40000": lambda: _png_claiming(40000, 40000),
    "png-9000x8000": lambda: _png_claiming(9000, 8000),  # under Pillow's own limit, over ours
    "jpeg-65000x65000": lambda: _jpeg_claiming(65000, 65000),
    "bmp-30000x30000": lambda: _bmp_claiming(30000, 30000),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(name, tmp_path):
    data = BOMBS[name]()
    assert len(data) < 8192
    path = tmp_path / "bomb.img"
    path.write_bytes(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="pixels|bomb") as caught:
        prepare_input_from_uri(str(path))
    elapsed = time.perf_counter() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert str(path) in str(caught.value)
    assert elapsed < 0.25, f"took {elapsed:.3f} s"
    assert grown_mib < 20, f"peak memory grew {grown_mib:.0f} MiB"


def test_pixel_cap_is_configurable(monkeypatch):
    data = _png(Image.fromarray(_gradient((100, 100))))
    assert load_image(data).size == (100, 100)
    with pytest.raises(InvalidImageError, match="100x100 pixels"):
        decode(data, max_pixels=9999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "9999")
    with pytest.raises(InvalidImageError, match=MAX_PIXELS_ENV):
        load_image(data)


# --- byte cap ---------------------------------------------------------------------------------


def test_byte_cap_keyword_and_environment(tmp_path, monkeypatch):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert len(data) > 1000
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    assert load_image(path).size == (64, 64)
    with pytest.raises(InvalidImageError, match="over the 1000-byte cap"):
        load_image(path, max_bytes=1000)
    with pytest.raises(InvalidImageError, match="over the 1000-byte cap"):
        load_image(data, max_bytes=1000)
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    with pytest.raises(InvalidImageError, match="over the 1000-byte cap"):
        prepare_input_from_uri(str(path))
    assert load_image(path, max_bytes=len(data)).size == (64, 64)  # the keyword wins
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_BYTES_ENV} must be a positive integer"):
        load_image(path)


def test_reading_a_small_file_does_not_reserve_the_cap(tmp_path):
    path = tmp_path / "note.jpg"
    path.write_bytes(b"not an image" * 10)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError, match="not an image"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), f"peak {peak / 2**20:.1f} MiB for a 120-byte file"


# --- bad servers ------------------------------------------------------------------------------

PHOTO = _encode(Image.fromarray(_gradient((64, 64))), "JPEG")
HTML = b"<!DOCTYPE html><html><body><h1>Server error</h1></body></html>"


def _gzip_zeros(mib: int) -> bytes:
    """``mib`` MiB of zeros, gzip-compressed a MiB at a time (about 1 KB per MiB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(mib)) + compressor.flush()


GZIP_BOMB = _gzip_zeros(64)

# name -> (behaviour, a pattern the reason must contain)
SERVER_FAULTS = {
    "http-404": (reply(HTML, status="404 Not Found", content_type="text/html"), "HTTP 404"),
    "http-500": (reply(HTML, status="500 Internal Server Error", content_type="text/html"), "HTTP 500"),
    "http-403-image": (reply(PHOTO, status="403 Forbidden", content_type="image/jpeg"), "HTTP 403"),
    "html-200": (reply(HTML, content_type="text/html; charset=utf-8"), "text/html"),
    "html-as-image-jpeg": (reply(HTML, content_type="image/jpeg"), "not an image"),
    "empty-body": (reply(b"", content_type="image/jpeg"), "empty"),
    "short-body": (reply(PHOTO[:300], content_type="image/jpeg", content_length=len(PHOTO)), "IncompleteRead"),
    "truncated-no-length": (reply(PHOTO[:300], content_type="image/jpeg", content_length=False), "truncated"),
    # Silence trips the read timeout or the deadline watchdog, whichever fires first on a busy machine.
    "never-answers": (stall(), "deadline|timed out"),
    "head-then-silence": (stall(send_head=True), "deadline|timed out"),
    "drips-body": (drip(), "deadline"),
    "drips-body-no-length": (drip(content_length=None), "deadline"),
    "drips-headers": (drip(in_head=True), "deadline"),
    "endless-no-length": (endless(), "still streaming"),
    # A client reads no more than the declared length: a server cannot push more past the cap.
    "endless-lying-length": (endless(content_length=500_000), "not an image"),
    "length-over-cap": (endless(content_length=10**12), "body of 1000000000000 bytes"),
    "gzip-bomb": (reply(GZIP_BOMB, content_type="image/png", headers={"Content-Encoding": "gzip"}), "cap"),
    "redirect-loop": (reply(b"", status="302 Found", headers={"Location": "/photo.jpg"}), "redirects"),
    "garbage-status-line": (lambda conn, stop: conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n"), "fetched"),
}
CAP = 1 << 20


@pytest.mark.parametrize("name", sorted(SERVER_FAULTS))
def test_bad_servers_give_the_documented_error_on_time(name):
    behaviour, reason = SERVER_FAULTS[name]
    with RawServer(behaviour) as server:
        url = f"{server.url}/photo.jpg"
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(InvalidImageError) as caught:
                load_image(url, max_bytes=CAP, deadline_s=DEADLINE_S)
        finally:
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert caught.value.uri == url
    # The body buffer never grows far past the cap (a gzip bomb is decoded a chunk at a time).
    assert peak < 4 * CAP, f"peak {peak / 2**20:.1f} MiB"
    assert re.search(reason, caught.value.reason), caught.value.reason
    assert elapsed < MAX_WAIT_S, f"took {elapsed:.2f} s"


def test_a_server_that_never_accepts_is_abandoned_by_the_deadline():
    with RawServer(stall(), accept=False) as server:
        started = time.monotonic()
        with pytest.raises(InvalidImageError, match="deadline|timed out"):
            load_image(server.url + "/x.jpg", deadline_s=DEADLINE_S)
        assert time.monotonic() - started < MAX_WAIT_S


def test_https_to_a_server_that_never_answers_the_handshake():
    """The TLS connection class is watched too: a stalled handshake meets the deadline."""
    with RawServer(stall()) as server:
        url = server.url.replace("http://", "https://") + "/x.jpg"
        started = time.monotonic()
        with pytest.raises(InvalidImageError, match="deadline|timed out"):
            load_image(url, deadline_s=DEADLINE_S)
        assert time.monotonic() - started < MAX_WAIT_S


def test_connection_refused():
    with RawServer(stall()) as server:
        url = server.url
    with pytest.raises(InvalidImageError, match="could not be fetched"):
        prepare_input_from_uri(url + "/gone.jpg")


def test_a_good_image_from_the_raw_server(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(PHOTO)
    for content_length in (True, False):
        with RawServer(reply(PHOTO, content_type="image/jpeg", content_length=content_length)) as server:
            tensor = prepare_input_from_uri(server.url + "/photo.jpg")
        assert torch.equal(tensor, prepare_input_from_uri(str(path)))
    gzipped = reply(gzip.compress(PHOTO), content_type="image/jpeg", headers={"Content-Encoding": "gzip"})
    with RawServer(gzipped) as server:
        assert torch.equal(prepare_input_from_uri(server.url + "/photo.jpg"), tensor)
