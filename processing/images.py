"""The one hardened image loader behind every entry point (utilities, CLI, batch helpers).

``load_image(uri)`` returns an upright RGB ``PIL.Image`` or raises :class:`InvalidImageError`
(a ``ValueError``) naming the URI and the reason. It never decodes more than it must:
bodies are capped while streaming, the pixel count is checked from the header before
decoding, and network reads have connect/read timeouts and a total deadline.

Modes: alpha (RGBA, LA, PA, palette with transparency) is composited onto
:data:`BACKGROUND` (white); 16/32-bit integer images are scaled to 8 bits (``v * 255 / 65535``,
not clipped); float images are read as [0, 1]; everything else uses Pillow's RGB conversion.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | Image.Image

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
MAX_BYTES = 40 * 1024 * 1024
MAX_PIXELS = 64_000_000
BACKGROUND = (255, 255, 255)
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
DEADLINE_S = 30.0
_CHUNK = 64 * 1024


class InvalidImageError(ValueError):
    """This URI does not give a usable image. ``uri`` and ``reason`` are attributes."""

    def __init__(self, uri: object, reason: str) -> None:
        self.uri = str(uri)
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")


def is_url(uri: object) -> bool:
    return isinstance(uri, str) and urlparse(uri).scheme in ("http", "https")


def _fetch(url: str, max_bytes: int, deadline_s: float) -> bytes:
    started = time.monotonic()
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
            if response.status_code >= 400:
                raise InvalidImageError(url, f"HTTP {response.status_code} {response.reason}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type.startswith("text/"):
                raise InvalidImageError(url, f"the server sent {content_type}, not an image")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise InvalidImageError(url, f"body of {int(declared)} bytes is over the {max_bytes}-byte cap")
            body = bytearray()
            while chunk := response.raw.read1(_CHUNK, decode_content=True):
                body += chunk
                if len(body) > max_bytes:
                    raise InvalidImageError(url, f"body is over the {max_bytes}-byte cap")
                if time.monotonic() - started > deadline_s:
                    raise InvalidImageError(url, f"download took over {deadline_s:g} s")
            return bytes(body)
    except requests.Timeout as error:
        raise InvalidImageError(url, f"timed out ({error.__class__.__name__})") from error
    except (requests.RequestException, OSError) as error:
        raise InvalidImageError(url, f"could not be fetched: {error}") from error


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidImageError(path, "is not a file")
        if size > max_bytes:
            raise InvalidImageError(path, f"file of {size} bytes is over the {max_bytes}-byte cap")
        return path.read_bytes()
    except FileNotFoundError as error:
        raise InvalidImageError(path, "no such file") from error
    except OSError as error:
        raise InvalidImageError(path, f"could not be read: {error.strerror or error}") from error


def read_source(source: str | Path | bytes, *, max_bytes: int = MAX_BYTES, deadline_s: float = DEADLINE_S) -> bytes:
    """The encoded bytes of a URL, a path or a bytes object (capped at ``max_bytes``)."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise InvalidImageError("<bytes>", f"{len(source)} bytes is over the {max_bytes}-byte cap")
        return bytes(source)
    if is_url(source):
        return _fetch(str(source), max_bytes, deadline_s)
    return _read_file(Path(source).expanduser(), max_bytes)


def decode(data: bytes, uri: object = "<bytes>", *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes after checking format and pixel count from the header."""
    if not data:
        raise InvalidImageError(uri, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as error:
            head = data[:16]
            raise InvalidImageError(uri, f"not an image (first bytes {head!r})") from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InvalidImageError(uri, f"refused as a decompression bomb: {error}") from error
        except Exception as error:  # Pillow raises many types on malformed headers
            raise InvalidImageError(uri, f"unreadable image header: {error}") from error
        if image.format not in ALLOWED_FORMATS:
            raise InvalidImageError(uri, f"format {image.format} is not one of {sorted(ALLOWED_FORMATS)}")
        width, height = image.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise InvalidImageError(uri, f"{width}x{height} pixels is outside 1..{max_pixels} pixels")
        try:
            image.load()
        except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
            raise InvalidImageError(uri, f"truncated or corrupt {image.format} data: {error}") from error
    return image


def _composite(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright (EXIF orientation applied) 8-bit RGB copy of ``image``."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a good image unusable
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite(image)
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        values = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    deadline_s: float = DEADLINE_S,
) -> Image.Image:
    """An RGB image from a URL, a path, encoded bytes or a ``PIL.Image``.

    Raises :class:`InvalidImageError` for anything that does not give a usable image.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if not isinstance(source, (str, Path, bytes, bytearray)):
        expected = "a URL, path, bytes or PIL.Image"
        raise InvalidImageError(repr(source)[:80], f"expected {expected}, got {type(source).__name__}")
    data = read_source(source, max_bytes=max_bytes, deadline_s=deadline_s)
    uri = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
    return to_rgb(decode(data, uri, max_pixels=max_pixels))
