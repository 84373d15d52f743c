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
  in the headers) is abandoned on time too.

Modes: alpha (RGBA, LA, PA, palette with transparency) is composited onto
:data:`BACKGROUND` (white); 16/32-bit integer images (I;16, I) are scaled to 8 bits
(``v * 255 / 65535``, not clipped); float images (F) are read as [0, 1]; everything else
(1, L, P, CMYK, YCbCr, ...) uses Pillow's RGB conversion. EXIF orientation is applied.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection

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
_CHUNK = 64 * 1024


class InvalidImageError(ValueError):
    """This URI does not give a usable image. ``uri`` and ``reason`` are attributes."""

    def __init__(self, uri: object, reason: str) -> None:
        self.uri = str(uri)
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


def is_url(uri: object) -> bool:
    return isinstance(uri, str) and urlparse(uri).scheme in ("http", "https")


class _Watchdog:
    """Shuts down every socket of one fetch when its deadline passes, which unblocks any read."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _WatchedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, watchdog: _Watchdog, **kwargs: Any) -> None:
        self._watchdog = watchdog
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._watchdog.watch(sock)
        return sock


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _WatchedPoolManager(PoolManager):
    """Pools whose connections register their sockets with one fetch's watchdog."""

    def __init__(self, watchdog: _Watchdog, **kwargs: Any) -> None:
        self._watchdog = watchdog
        super().__init__(**kwargs)

    def _new_pool(self, scheme: str, host: str, port: int, request_context: dict | None = None) -> Any:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = _WatchedHTTPSConnection if scheme == "https" else _WatchedHTTPConnection
        pool.conn_kw["watchdog"] = self._watchdog
        return pool


class _WatchedAdapter(HTTPAdapter):
    def __init__(self, watchdog: _Watchdog) -> None:
        self._watchdog = watchdog
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        self._pool_connections, self._pool_maxsize, self._pool_block = connections, maxsize, block
        self.poolmanager = _WatchedPoolManager(
            self._watchdog, num_pools=connections, maxsize=maxsize, block=block, **kwargs
        )


def _fetch(url: str, max_bytes: int, deadline_s: float) -> bytes:
    timeout = (min(CONNECT_TIMEOUT_S, deadline_s), min(READ_TIMEOUT_S, deadline_s))
    too_slow = f"gave up after the {deadline_s:g} s deadline (the server is too slow or drips bytes)"
    with _Watchdog(deadline_s) as watchdog, requests.Session() as session:
        session.mount("http://", _WatchedAdapter(watchdog))
        session.mount("https://", _WatchedAdapter(watchdog))
        try:
            with session.get(url, stream=True, timeout=timeout) as response:
                if response.status_code >= 400:
                    raise InvalidImageError(url, f"HTTP {response.status_code} {response.reason}")
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if content_type.startswith("text/"):
                    raise InvalidImageError(url, f"the server sent {content_type}, not an image")
                declared = response.headers.get("Content-Length", "").strip()
                if declared.isdigit() and int(declared) > max_bytes:
                    raise InvalidImageError(url, f"body of {int(declared)} bytes is over the {max_bytes}-byte cap")
                body = bytearray()
                # read1 returns what has arrived (up to _CHUNK decoded bytes) instead of waiting
                # for a full chunk, so the cap and the deadline are checked as bytes come in.
                read = getattr(response.raw, "read1", response.raw.read)  # read1: urllib3 >= 2
                while chunk := read(_CHUNK, decode_content=True):
                    body += chunk
                    if len(body) > max_bytes:
                        raise InvalidImageError(url, f"body is over the {max_bytes}-byte cap (still streaming)")
                if watchdog.expired:
                    raise InvalidImageError(url, too_slow)
                return bytes(body)
        except InvalidImageError:
            raise
        except (requests.Timeout, urllib3.exceptions.TimeoutError) as error:
            reason = too_slow if watchdog.expired else f"timed out ({error.__class__.__name__})"
            raise InvalidImageError(url, reason) from error
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            if watchdog.expired:
                reason = too_slow
            elif "IncompleteRead" in str(error):
                reason = f"the body was cut short ({error})"
            else:
                reason = f"could not be fetched: {error}"
            raise InvalidImageError(url, reason) from error


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


def read_source(source: str | Path | bytes, *, max_bytes: int | None = None, deadline_s: float = DEADLINE_S) -> bytes:
    """The encoded bytes of a URL, a path or a bytes object (capped at ``max_bytes``)."""
    max_bytes = _limit(max_bytes, MAX_BYTES_ENV, MAX_BYTES)
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise InvalidImageError("<bytes>", f"{len(source)} bytes is over the {max_bytes}-byte cap")
        return bytes(source)
    if is_url(source):
        return _fetch(str(source), max_bytes, deadline_s)
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


def decode(data: bytes, uri: object = "<bytes>", *, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded bytes after checking format and pixel count from the header."""
    max_pixels = _limit(max_pixels, MAX_PIXELS_ENV, MAX_PIXELS)
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


def load_image(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    deadline_s: float = DEADLINE_S,
) -> Image.Image:
    """An upright RGB image from a URL, a path, encoded bytes or a ``PIL.Image``.

    ``max_bytes`` / ``max_pixels`` default to ``$RESNEXT_HUB_MAX_IMAGE_BYTES`` /
    ``$RESNEXT_HUB_MAX_IMAGE_PIXELS``, else :data:`MAX_BYTES` / :data:`MAX_PIXELS`;
    ``deadline_s`` bounds a URL's whole fetch (see the module docstring).

    Raises :class:`InvalidImageError` (a ``ValueError`` naming the URI and the reason) for
    anything that does not give a usable image; ``ValueError`` for a malformed limit variable.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if not isinstance(source, (str, Path, bytes, bytearray)):
        expected = "a URL, path, bytes or PIL.Image"
        raise InvalidImageError(repr(source)[:80], f"expected {expected}, got {type(source).__name__}")
    data = read_source(source, max_bytes=max_bytes, deadline_s=deadline_s)
    uri = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
    return to_rgb(decode(data, uri, max_pixels=max_pixels), uri)
