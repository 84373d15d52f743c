"""Is this file the checkpoint it should be? Hashes, ``<file>.sha256.json`` stamps and cheap structure checks.

A stamp records a cached file's SHA-256 with its size and mtime: a load re-checks the cheap
size+mtime and re-hashes only when they changed. The structure checks catch files cut short or of
another kind where no hash is published (a torch zip needs its central directory and records; a
safetensors header fixes the file's size).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickletools
import re
import stat
from pathlib import Path

from ..processing.atomic import write_atomic
from .checkpoint import torch_zip_problem
from .weights import Source

log = logging.getLogger(__name__)

MAX_STAMP_BYTES = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy (pre-1.6) format
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def stamp_text(sha256: str, seen: os.stat_result) -> str:
    """The stamp of a file whose stat is ``seen`` and whose SHA-256 is ``sha256``."""
    return json.dumps({"sha256": sha256, "size": seen.st_size, "mtime_ns": seen.st_mtime_ns})


def write_stamp(path: Path, sha256: str, seen: os.stat_result) -> None:
    """Stamp a verified cached file (``seen``: its stat when hashed). Where the cache cannot be written
    (read-only, full) no stamp is written (logged at debug): the file is verified again on the next load."""
    try:
        write_atomic(stamp_path(path), stamp_text(sha256, seen))
    except OSError as error:
        log.debug("no stamp written for %s (read-only or full cache?): %s", path, error)


def read_stamp(path: Path) -> dict | None:
    """The stamp of ``path`` if it is one (a small JSON object of the right types); None otherwise."""
    try:
        # Non-blocking: a FIFO in its place must not hang the load.
        with open(os.open(stamp_path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            stamp = json.loads(handle.read(MAX_STAMP_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(stamp, dict) or not (isinstance(stamp.get("sha256"), str) and _SHA256.fullmatch(stamp["sha256"])):
        return None
    if not all(type(stamp.get(key)) is int for key in ("size", "mtime_ns")):
        return None
    return stamp


def expected_problem(path: Path, source: Source, sha256: str) -> str | None:
    """Why ``path`` (with digest ``sha256``) is not ``source``'s file, or None if it is."""
    size = path.stat().st_size
    if source.size_bytes is not None and size != source.size_bytes:
        return f"size {size} bytes, expected {source.size_bytes}"
    if source.sha256 is not None and sha256 != source.sha256:
        return f"sha256 {sha256}, expected {source.sha256}"
    match = HASH_IN_NAME.search(source.file_name)
    if match and not sha256.startswith(match.group(1)):
        return f"sha256 {sha256[: len(match.group(1))]}..., expected the prefix {match.group(1)} in its name"
    return None


def _safetensors_problem(handle: io.BufferedReader, size: int) -> str | None:
    if size < 8:
        return f"{size} bytes is too short for a safetensors file"
    header_len = int.from_bytes(handle.read(8), "little")
    if header_len > min(size - 8, 100 << 20):
        return f"its safetensors header claims {header_len} bytes of {size}"
    try:
        header = json.loads(handle.read(header_len))
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return "its safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return f"its safetensors header is a JSON {type(header).__name__}, expected an object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if not valid or not 0 <= offsets[0] <= offsets[1]:
            shown = json.dumps(entry)[:80]
            return f"its safetensors header gives {name[:80]!r} {shown}, expected data_offsets [begin, end] (ints)"
        end = max(end, offsets[1])
    expected = 8 + header_len + end
    return None if expected == size else f"{size} bytes, but its header describes {expected}"


def _legacy_problem(head: bytes) -> str | None:
    """None if ``head`` starts with the magic-number pickle of torch's legacy format."""
    try:
        ops = []
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            ops.append((opcode.name, arg))
    except ValueError:  # not a whole pickle within ``head``
        ops = []
    values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
    if values == [_TORCH_MAGIC]:
        return None
    return "a pickle file, but not a torch checkpoint (no torch magic number at its start)"


def format_problem(path: Path, file_format: str = "torch") -> str | None:
    """Why ``path`` cannot be a whole checkpoint file (cut short, an HTML page, another kind of file), or None.

    Cheap structural checks that catch truncation where no hash is published: a torch zip
    file needs its central directory at the end and a ``data.pkl`` record; a legacy torch
    file starts with torch's magic number; a safetensors file's header fixes its size. They
    never raise for what a file contains (only OSError, for a file that cannot be read).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if file_format == "safetensors":
            return _safetensors_problem(handle, size)
        head = handle.read(64)
        handle.seek(257)
        tar = handle.read(5) == b"ustar"
    if head.startswith(b"PK\x03\x04"):
        problem = torch_zip_problem(path)
        return None if problem is None else f"a damaged or cut-short torch (zip) file: {problem}"
    if head[:1] == b"\x80":  # torch's legacy (pre-1.6) pickle format: no cheap end check
        return _legacy_problem(head)
    if tar:  # torch's oldest (tar) format
        return None
    return f"not a torch checkpoint file (it starts with {head[:8]!r})"


def cached_problem(path: Path, seen: os.stat_result, source: Source, stamp: dict | None) -> str | None:
    """Why the cached file ``path`` (``seen``: its stat) is not intact, or None (then stamped, if the cache allows)."""
    if not stat.S_ISREG(seen.st_mode):  # a FIFO or a link to a device would never end
        return "it is not a regular file"
    if stamp and stamp["size"] == seen.st_size and stamp["mtime_ns"] == seen.st_mtime_ns:
        return None
    if source.size_bytes is not None and seen.st_size != source.size_bytes:
        return f"size {seen.st_size} bytes, expected {source.size_bytes}"
    digest = sha256_of(path)
    problem = expected_problem(path, source, digest) or format_problem(path, source.file_format)
    if problem is None and stamp and stamp["sha256"] != digest:
        problem = f"sha256 {digest}, recorded at download as {stamp['sha256']}"
    if problem is None:
        write_stamp(path, digest, seen)
    return problem
