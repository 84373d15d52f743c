"""Find a checkpoint file: torch.hub's cache, a mirror, or a download into that cache.

Downloads stream through ``requests`` (connect/read timeouts, a total deadline, short
bodies refused) into a private temporary file that is renamed into place only after its
size and hash check out, so an interrupted or concurrent download never leaves a bad
file in the cache. Files without a published SHA-256 get one recorded at download (a
``.sha256.json`` stamp beside the file) and are re-checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import requests
import torch.hub

from .weights import Source

log = logging.getLogger(__name__)

MIRROR_ENV = "RESNEXT_HUB_WEIGHTS_MIRROR"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DEADLINE_S = 3600.0
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
_CHUNK = 1 << 20


class WeightsUnavailableError(RuntimeError):
    """A checkpoint could not be found, fetched or verified."""


def cache_dir() -> Path:
    """``<torch.hub.get_dir()>/checkpoints`` (follows ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_url(text: str) -> bool:
    return urlparse(str(text)).scheme in ("http", "https")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _write_stamp(path: Path, sha256: str) -> None:
    stat = path.stat()
    stamp = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stamp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, _stamp_path(path))


def _expected_problem(path: Path, source: Source, sha256: str) -> str | None:
    """Why ``path`` (with digest ``sha256``) is not ``source``'s file, or None if it is."""
    size = path.stat().st_size
    if source.size_bytes is not None and size != source.size_bytes:
        return f"size {size} bytes, expected {source.size_bytes}"
    if source.sha256 is not None and sha256 != source.sha256:
        return f"sha256 {sha256}, expected {source.sha256}"
    match = _HASH_IN_NAME.search(source.file_name)
    if match and not sha256.startswith(match.group(1)):
        return f"sha256 {sha256[: len(match.group(1))]}..., expected the prefix {match.group(1)} in its name"
    return None


def verify_cached(path: Path, source: Source) -> bool:
    """True if a cached file is intact: its stamp still matches, or its hash does."""
    stamp_file = _stamp_path(path)
    stat = path.stat()
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp and stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns:
        return True
    digest = sha256_of(path)
    problem = _expected_problem(path, source, digest)
    if problem is None and stamp and stamp.get("sha256") not in (None, digest):
        problem = f"sha256 {digest}, recorded at download as {stamp['sha256']}"
    if problem:
        log.warning("cached checkpoint %s is corrupt (%s); deleting it", path, problem)
        return False
    _write_stamp(path, digest)
    return True


def download(url: str, dest: Path, source: Source, *, progress: bool = True) -> Path:
    """Stream ``url`` into ``dest`` atomically, checking size and hashes; return ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    digest = hashlib.sha256()
    started = time.monotonic()
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
            response.raise_for_status()
            declared = response.headers.get("Content-Length")
            total = int(declared) if declared and declared.isdigit() else None
            received = 0
            with (
                open(tmp, "wb") as handle,
                torch.hub.tqdm(total=total, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar,
            ):
                for chunk in response.iter_content(_CHUNK):
                    if time.monotonic() - started > DEADLINE_S:
                        raise WeightsUnavailableError(f"download of {url} took over {DEADLINE_S:.0f} s; gave up")
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise WeightsUnavailableError(f"download of {url} ended after {received} of {total} bytes")
        problem = _expected_problem(tmp, source, digest.hexdigest())
        if problem:
            raise WeightsUnavailableError(f"downloaded {url} does not match the manifest: {problem}")
        os.replace(tmp, dest)
        _write_stamp(dest, digest.hexdigest())
        return dest
    except requests.RequestException as error:
        raise WeightsUnavailableError(
            f"could not download {url} to {dest}: {error}. Offline? Put {source.file_name} in a folder "
            f"and set {MIRROR_ENV}=/that/folder (or a base URL that serves it)."
        ) from error
    finally:
        tmp.unlink(missing_ok=True)


def _from_mirror(mirror: str, source: Source, dest: Path, progress: bool) -> Path:
    if is_url(mirror):
        return download(mirror.rstrip("/") + "/" + source.file_name, dest, source, progress=progress)
    path = Path(mirror).expanduser() / source.file_name
    if not path.is_file():
        raise WeightsUnavailableError(f"{MIRROR_ENV}={mirror!r} has no file {source.file_name!r} (looked for {path})")
    return path


def fetch_checkpoint(sources: tuple[Source, ...], *, progress: bool = True) -> tuple[Path, Source]:
    """Path of a verified local copy of the first source that can be had, and that source.

    Order: torch.hub's cache; then ``$RESNEXT_HUB_WEIGHTS_MIRROR`` (a folder or base URL
    holding the files by name) if set, else each source's URL. A corrupt cached file is
    deleted and fetched again.
    """
    mirror = os.environ.get(MIRROR_ENV)
    failures = []
    for source in sources:
        dest = cache_dir() / source.file_name
        if dest.is_file():
            if verify_cached(dest, source):
                return dest, source
            dest.unlink(missing_ok=True)
            _stamp_path(dest).unlink(missing_ok=True)
        try:
            if mirror:
                return _from_mirror(mirror, source, dest, progress), source
            return download(source.url, dest, source, progress=progress), source
        except WeightsUnavailableError as error:
            failures.append(str(error))
    where = f"{MIRROR_ENV}={mirror!r}" if mirror else f"{MIRROR_ENV} (unset)"
    raise WeightsUnavailableError(
        "no source of these weights could be used:\n  - "
        + "\n  - ".join(failures)
        + f"\nCache folder: {cache_dir()}; mirror: {where}; or pass pretrained_from_file=PATH."
    )
