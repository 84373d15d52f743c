"""The one hardened image loader behind every entry point (utilities, CLI, batch helpers).

``load_image(uri)`` returns an upright RGB ``PIL.Image`` or raises :class:`InvalidImageError`
(a ``ValueError``) whose message names the URI and the reason. Nothing else escapes for bad
input: missing, empty or unreadable files; bytes that are not an image (an HTML error page
saved as ``.jpg`` or served as ``text/html``); formats outside :data:`ALLOWED_FORMATS`;
truncated or corrupt data; HTTP errors; timeouts; bodies over the byte cap.

Limits (keywords of :func:`load_image`; defaults below):

- ``max_bytes``: encoded size cap, default :data:`MAX_BYTES` (40 MiB) or the environment
  variable ``RESNEXT_HUB_MAX_IMAGE_BYTES``. Enforced while streaming, with or without a
  ``Content-Length``, so an endless body costs at most the cap.
- ``max_pixels``: width x height cap, default :data:`MAX_PIXELS` (64 M) or
  ``RESNEXT_HUB_MAX_IMAGE_PIXELS``. Checked from the header before any pixel is decoded,
  so a few-KB "decompression bomb" is refused in milliseconds without allocating it.
- ``deadline_s``: total time for a URL, default :data:`DEADLINE_S` (30 s). Connect and read
  timeouts (5 s / 10 s, never more than the deadline) catch a server that does not answer; a
  watchdog shuts the socket when the deadline passes, so one that drips bytes (in the body or
  in the headers) is abandoned on time too. URLs are fetched by :mod:`.fetch`; an
  :class:`InvalidImageError` for one that could not be fetched has the ``FetchError`` as its
  ``__cause__``.

Modes: alpha (RGBA, LA, PA, palette with transparency) is composited onto
:data:`BACKGROUND` (white); 16/32-bit integer images (I;16, I) are scaled to 8 bits
(``v * 255 / 65535``, not clipped); float images (F) are read as [0, 1]; everything else
(1, L, P, CMYK, YCbCr, ...) uses Pillow's RGB conversion. EXIF orientation is applied.

Decoding at the size needed (``min_size``, the preset's resize target): a model resizes a 4032x3024
photo to 256 pixels on its short side, so decoding all 12 M pixels (about 100-130 ms on one core)
is wasted work. Given ``min_size``, a source whose short side is at least four times it is decoded
smaller, never below twice ``min_size`` and by a factor that divides both sides (exact geometry,
see :func:`reduction`): JPEG by libjpeg's DCT-domain scaling (``Image.draft``: 1/2, 1/4 or 1/8,
while decoding), then any format by an integer box reduction (``Image.reduce``) for the rest. The
preset's resize still downsamples by 2x or more, so the result stays close to the full decode's:
on the final preprocessed tensor of generated camera photos with NVIDIA's preset, 0.18-0.24 levels
of 255 on average and 2-4 at most (tests/processing/test_decode_at_size.py holds the bound).
``min_size=None`` (the default, and what NVIDIA's utilities use) decodes every pixel.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fetch import AddressPolicy, FetchError, URLRefusedError, fetch_bytes, is_url, redact

ImageSource = str | Path | bytes | Image.Image

# The parsers Image.open may try (JPEG's also reads phones' multi-picture MPO files).
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
ALLOWED_FORMATS = frozenset({*OPEN_FORMATS, "MPO"})
MAX_BYTES = 40 * 1024 * 1024
MAX_PIXELS = 64_000_000
MAX_BYTES_ENV = "RESNEXT_HUB_MAX_IMAGE_BYTES"
MAX_PIXELS_ENV = "RESNEXT_HUB_MAX_IMAGE_PIXELS"
BACKGROUND = (255, 255, 255)
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
DEADLINE_S = 30.0
# Ask for the formats that can be opened, so content negotiation does not pick AVIF or JPEG XL.
_ACCEPT = ", ".join(f"image/{name.lower()}" for name in OPEN_FORMATS) + ", */*;q=0.5"


class InvalidImageError(ValueError):
    """This URI does not give a usable image. ``uri`` and ``reason`` are attributes."""

    def __init__(self, uri: object, reason: str) -> None:
        self.uri = redact(str(uri))  # a URL's user name and password never reach a message
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")


def _limit(value: int | None, env: str, default: int) -> int:
    """``value``, else the positive integer in ``$env``, else ``default``."""
    if value is not None:
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{env} must be a positive integer (a count), got {text!r}")
    return int(text)


def max_image_bytes(max_bytes: int | None = None) -> int:
    """The encoded-size cap in force: ``max_bytes``, else ``$RESNEXT_HUB_MAX_IMAGE_BYTES``, else :data:`MAX_BYTES`."""
    return _limit(max_bytes, MAX_BYTES_ENV, MAX_BYTES)


def _fetch(url: str, max_bytes: int, deadline_s: float, allow: AddressPolicy | None) -> bytes:
    try:
        return fetch_bytes(
            url,
            max_bytes=max_bytes,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            read_timeout_s=READ_TIMEOUT_S,
            deadline_s=deadline_s,
            allow=allow,
            headers={"Accept": _ACCEPT},
            expected="an image",
        )
    except FetchError as error:
        verb = "refused" if isinstance(error, URLRefusedError) else "could not be fetched"
        raise InvalidImageError(url, f"{verb}: {error.reason}") from error


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        if not path.is_file():
            reason = "is not a regular file" if path.exists() else "no such file"
            raise InvalidImageError(path, reason)
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidImageError(path, f"file of {size} bytes is over the {max_bytes}-byte cap")
        with open(path, "rb") as handle:
            # One byte more than stat() said shows a file that grew meanwhile; reading max_bytes + 1
            # would make Python allocate the whole cap for every small file.
            data = handle.read(size + 1)
        if len(data) > size:
            raise InvalidImageError(path, "file changed while it was read")
        return data
    except OSError as error:
        raise InvalidImageError(path, f"could not be read: {error.strerror or error}") from error


def read_source(
    source: str | Path | bytes,
    *,
    max_bytes: int | None = None,
    deadline_s: float = DEADLINE_S,
    allow: AddressPolicy | None = None,
) -> bytes:
    """The encoded bytes of a URL, a path or a bytes object (capped at ``max_bytes``).

    ``allow``: the address policy for URLs (see :mod:`.fetch`); given one, a string is always
    fetched as a URL, never opened as a local path (it came from someone else).
    """
    max_bytes = max_image_bytes(max_bytes)
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise InvalidImageError("<bytes>", f"{len(source)} bytes is over the {max_bytes}-byte cap")
        return bytes(source)
    if allow is not None or is_url(source):
        return _fetch(str(source), max_bytes, deadline_s, allow)
    if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
        raise InvalidImageError(source, "is not a valid http(s) URL")
    return _read_file(Path(source).expanduser(), max_bytes)


# Leading bytes of the allowed formats: data that starts like one but fails to parse is broken, not foreign.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _format_name(data: bytes) -> str | None:
    """The format whose magic number ``data`` starts with, to name a refused one.

    Only the plugins' prefix checks run: hostile bytes never reach a non-allowed parser.
    """
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            matched = accept is not None and accept(prefix)
        except Exception:  # a prefix check that cannot handle short data
            continue
        if matched and not isinstance(matched, str):  # a str is Pillow's "maybe" warning
            return name
    return None


def check_min_size(min_size: int | None) -> None:
    """``ValueError`` unless ``min_size`` is None or a positive int (a decode target in pixels)."""
    if min_size is not None and (not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1):
        raise ValueError(f"min_size must be None or a positive int (pixels on the short side), got {min_size!r}")


def _reduces(size: tuple[int, int], factor: int, min_size: int) -> bool:
    """Whether ``factor`` divides both sides of ``size`` and leaves the short side at least twice ``min_size``.

    Dividing both sides keeps the geometry exact: the reduced pixel grid spans the source exactly,
    so the preset's resize samples the same points. A factor that leaves a partial block at an edge
    stretches the image by up to a block (reducing 1008x756 pixels by 5 moved sharp edges by a third
    of an output pixel: 30 levels of 255), so sizes without a common factor are decoded in full.
    Camera and screen sizes have large common factors (4032x3024: 1008).
    """
    return min(size) >= 2 * min_size * factor and size[0] % factor == 0 and size[1] % factor == 0


def reduction(size: tuple[int, int], min_size: int) -> int:
    """The largest factor that divides both sides of ``size`` and keeps the short side at least twice ``min_size``.

    1: none (see :func:`_reduces` for why it must divide both sides).
    """
    factors = range(min(size) // (2 * min_size), 1, -1)
    return next((factor for factor in factors if _reduces(size, factor, min_size)), 1)


def decode(
    data: bytes, uri: object = "<bytes>", *, max_pixels: int | None = None, min_size: int | None = None
) -> Image.Image:
    """Decode encoded bytes after checking format and pixel count from the header.

    ``min_size``: a JPEG is decoded at the smallest of the 1/8, 1/4 and 1/2 scales that divides both
    sides and keeps the short side at least twice ``min_size`` (see the module docstring); other
    formats in full.
    """
    max_pixels = _limit(max_pixels, MAX_PIXELS_ENV, MAX_PIXELS)
    check_min_size(min_size)
    if not data:
        raise InvalidImageError(uri, "empty file")
    try:
        # Only the allowed formats' parsers ever see the bytes.
        image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except UnidentifiedImageError as error:
        other = _format_name(data)
        looks_like = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            looks_like = "WEBP"
        if looks_like is not None:
            reason = f"truncated or corrupt {looks_like} data (its header cannot be parsed)"
        elif other is not None:
            reason = f"format {other} is not one of {sorted(ALLOWED_FORMATS)}"
        else:
            reason = f"not an image (first bytes {data[:16]!r})"
        raise InvalidImageError(uri, reason) from error
    except Image.DecompressionBombError as error:
        raise InvalidImageError(uri, f"refused as a decompression bomb: {error}") from error
    except Exception as error:  # Pillow raises many types on malformed headers
        raise InvalidImageError(uri, f"truncated or corrupt image header: {error}") from error
    if image.format not in ALLOWED_FORMATS:
        raise InvalidImageError(uri, f"format {image.format} is not one of {sorted(ALLOWED_FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidImageError(
            uri, f"{width}x{height} pixels is outside 1..{max_pixels} pixels (set {MAX_PIXELS_ENV} to change)"
        )
    if min_size is not None:
        # JPEG/MPO decode at the smallest DCT scale (1/8, 1/4, 1/2) that keeps the rule; reduce_to does
        # any rest. Computed on the stored size: the one draft scales, and its short side
        # and divisors are those of the EXIF-oriented frame too.
        scale = next((s for s in (8, 4, 2) if _reduces(image.size, s, min_size)), 1)
        if scale > 1:  # Pillow picks the largest scale s with w // s, h // s at least the size asked
            image.draft("RGB", (image.width // scale, image.height // scale))  # a no-op for other formats
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
        raise InvalidImageError(uri, f"truncated or corrupt {image.format} data: {error}") from error
    return image


def _composite(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def to_rgb(image: Image.Image, uri: object = "<image>") -> Image.Image:
    """An upright (EXIF orientation applied) 8-bit RGB copy of ``image``."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a good image unusable
        pass
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode == "La":  # premultiplied: Pillow converts it only via LA
            image, mode = image.convert("LA"), "LA"
        if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in image.info):
            return _composite(image)
        if mode.startswith("I") or mode == "F":
            values = np.asarray(image, dtype=np.float64)
            scale = 255.0 if mode == "F" else 255.0 / 65535.0
            values = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
            return Image.fromarray(values).convert("RGB")
        return image.convert("RGB")
    except Exception as error:  # an exotic mode Pillow cannot convert, or a broken image object
        raise InvalidImageError(uri, f"mode {mode} could not be converted to RGB: {error}") from error


def reduce_to(image: Image.Image, min_size: int | None) -> Image.Image:
    """``image`` box-reduced by :func:`reduction`'s factor (the same image when that is 1 or ``min_size`` is None)."""
    if min_size is None:
        return image
    factor = reduction(image.size, min_size)
    return image.reduce(factor) if factor >= 2 else image


def load_image(
    source: ImageSource,
    *,
    min_size: int | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    deadline_s: float = DEADLINE_S,
    allow: AddressPolicy | None = None,
) -> Image.Image:
    """An upright RGB image from a URL, a path, encoded bytes or a ``PIL.Image``.

    ``min_size``: the size the caller will resize the short side to (a preset's ``resize_size``): a
    source at least twice that is decoded and reduced to a short side of at least twice it, not
    in full (see the module docstring). None (the default): every pixel, bit-exact.
    ``max_bytes`` / ``max_pixels`` default to ``$RESNEXT_HUB_MAX_IMAGE_BYTES`` /
    ``$RESNEXT_HUB_MAX_IMAGE_PIXELS``, else :data:`MAX_BYTES` / :data:`MAX_PIXELS`;
    ``deadline_s`` bounds a URL's whole fetch (see the module docstring); ``allow`` is the
    address policy for a URL from a stranger (see :func:`read_source`).

    Raises :class:`InvalidImageError` (a ``ValueError`` naming the URI and the reason) for
    anything that does not give a usable image; ``ValueError`` for a malformed limit variable.
    """
    check_min_size(min_size)
    if isinstance(source, Image.Image):
        return reduce_to(to_rgb(source), min_size)
    if not isinstance(source, (str, Path, bytes, bytearray)):
        expected = "a URL, path, bytes or PIL.Image"
        raise InvalidImageError(repr(source)[:80], f"expected {expected}, got {type(source).__name__}")
    data = read_source(source, max_bytes=max_bytes, deadline_s=deadline_s, allow=allow)
    uri = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
    return reduce_to(to_rgb(decode(data, uri, max_pixels=max_pixels, min_size=min_size), uri), min_size)
