"""Find a checkpoint file: torch.hub's cache, a mirror, or a download into that cache.

Downloads stream through :func:`processing.fetch.stream` (connect/read timeouts, a total
deadline that also cuts off a server dripping bytes, short bodies refused; the proxy variables
are honoured) into a private temporary file that is renamed into
place only after its size and hash check out, so an interrupted or concurrent download
never leaves a bad file in the cache: concurrent processes each download to their own
temporary file and the atomic rename makes one of the identical results win. Temporary
files of killed downloads are removed by the next fetch.

Integrity: a manifest SHA-256 (or the 8+ hex digits in a timm file name) is checked on
download. Every cached file gets a ``<file>.sha256.json`` stamp (its SHA-256 with its size
and mtime); a load re-checks the cheap size+mtime stamp and re-hashes only when it changed.
A file that fails is deleted and fetched once more, and the new download must have the
SHA-256 recorded the first time (trust on first use). A file that cannot be loaded into the
model it was fetched for is not trusted either: the builder calls :func:`forget` (file and
stamp deleted; a mirror folder's file is never deleted).

The file and its stamp are renamed in together, after both are fully written: a failed write
(a full disk, a read-only folder) leaves neither, and no temporary file. A read-only cache (an
admin's pre-filled volume) is used as it is: its files are verified on every load, no stamp is
written.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import pickletools
import re
import shutil
import socket
import stat
import time
import uuid
from contextlib import suppress
from pathlib import Path

import torch.hub

from ..processing.fetch import Body, DeadlineError, FetchError, is_url, redact, stream
from .checkpoint import torch_zip_problem
from .weights import Source

log = logging.getLogger(__name__)

MIRROR_ENV = "RESNEXT_HUB_WEIGHTS_MIRROR"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DEADLINE_S = 3600.0
# Cap on a download whose manifest gives no size (the largest published file is ~200 MB).
MAX_DOWNLOAD_BYTES = 8 << 30
_MAX_STAMP_BYTES = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy (pre-1.6) format
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
_CHUNK = 1 << 20
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


class WeightsUnavailableError(RuntimeError):
    """A checkpoint could not be found, fetched, verified or stored."""


def _how_to_fix() -> str:
    return (
        f"Set TORCH_HOME to a writable folder, or {MIRROR_ENV} to a folder (or base URL) holding the file, "
        "or pass pretrained_from_file=PATH."
    )


def cache_dir() -> Path:
    """``<torch.hub.get_dir()>/checkpoints`` (follows ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _stamp_file(path: Path, sha256: str, seen: os.stat_result) -> Path:
    """A temporary file holding ``path``'s stamp (``seen``: its stat), to be renamed into place.

    Raises OSError (nothing left behind) when it cannot be written.
    """
    stamp = {"sha256": sha256, "size": seen.st_size, "mtime_ns": seen.st_mtime_ns}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stamp")
    try:
        tmp.write_text(json.dumps(stamp))
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_stamp(path: Path, sha256: str, seen: os.stat_result) -> None:
    """Stamp a verified cached file (``seen``: its stat when hashed). Where the cache cannot be written
    (read-only, full) no stamp is written (logged at debug): the file is verified again on the next load."""
    try:
        tmp = _stamp_file(path, sha256, seen)
    except OSError as error:
        log.debug("no stamp written for %s (read-only or full cache?): %s", path, error)
        return
    try:
        os.replace(tmp, _stamp_path(path))
    except OSError as error:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.debug("no stamp written for %s: %s", path, error)


def _read_stamp(path: Path) -> dict | None:
    """The stamp of ``path`` if it is one (a small JSON object of the right types); None otherwise."""
    try:
        # Non-blocking: a FIFO in its place must not hang the load.
        with open(os.open(_stamp_path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            stamp = json.loads(handle.read(_MAX_STAMP_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(stamp, dict) or not (isinstance(stamp.get("sha256"), str) and _SHA256.fullmatch(stamp["sha256"])):
        return None
    if not all(type(stamp.get(key)) is int for key in ("size", "mtime_ns")):
        return None
    return stamp


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


def _cached_problem(path: Path, seen: os.stat_result, source: Source, stamp: dict | None) -> str | None:
    """Why the cached file ``path`` (``seen``: its stat) is not intact, or None (then stamped, if the cache allows)."""
    if not stat.S_ISREG(seen.st_mode):  # a FIFO or a link to a device would never end
        return "it is not a regular file"
    if stamp and stamp["size"] == seen.st_size and stamp["mtime_ns"] == seen.st_mtime_ns:
        return None
    if source.size_bytes is not None and seen.st_size != source.size_bytes:
        return f"size {seen.st_size} bytes, expected {source.size_bytes}"
    digest = sha256_of(path)
    problem = _expected_problem(path, source, digest) or format_problem(path, source.file_format)
    if problem is None and stamp and stamp["sha256"] != digest:
        problem = f"sha256 {digest}, recorded at download as {stamp['sha256']}"
    if problem is None:
        _write_stamp(path, digest, seen)
    return problem


def _partial_name(dest: Path) -> Path:
    # Host and pid in the name let a later fetch tell a killed download's leftovers from a live one.
    return dest.with_name(f".{dest.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}.partial")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill would terminate the process: rely on age alone there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_partials(dest: Path) -> list[Path]:
    """Delete temporary files of ``dest``'s downloads whose process is gone; return them."""
    removed = []
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial"):
        host, _, rest = path.name[len(dest.name) + 2 :].partition(".")
        pid = rest.partition(".")[0]
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:  # removed meanwhile
            continue
        dead = host == _HOST and pid.isdigit() and not _pid_alive(int(pid))
        if dead or age > DEADLINE_S + READ_TIMEOUT_S:
            try:
                path.unlink(missing_ok=True)
            except OSError as error:  # a read-only cache: it is only clutter
                log.debug("could not remove %s: %s", path, error)
                continue
            removed.append(path)
    return removed


def _check_length(body: Body, source: Source, folder: Path, shown: str) -> None:
    """Refuse, before any byte is written, a body whose Content-Length is not the manifest's size,
    or more than ``folder`` has free."""
    encoding = body.headers.get("Content-Encoding", "").strip().lower()
    if body.length is None or encoding not in ("", "identity"):  # the length on the wire is not the file's
        return
    if source.size_bytes is not None and body.length != source.size_bytes:
        raise WeightsUnavailableError(
            f"downloaded {shown} does not match the manifest: size {body.length} bytes (its Content-Length), "
            f"expected {source.size_bytes}"
        )
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if body.length > free:
        raise WeightsUnavailableError(
            f"{shown} is {body.length} bytes, but {folder} has only {free} bytes free: nothing was downloaded. "
            f"Free some space there. {_how_to_fix()}"
        )


def _install(tmp: Path, dest: Path, sha256: str) -> None:
    """Rename a verified download and its stamp into place: both, or (OSError raised) neither."""
    seen = tmp.stat()  # a rename keeps the size and mtime the stamp records
    stamp_tmp = _stamp_file(dest, sha256, seen)
    try:
        os.replace(tmp, dest)
        try:
            os.replace(stamp_tmp, _stamp_path(dest))
        except OSError:
            _discard(dest, seen)  # no file without its stamp
            raise
    finally:
        with suppress(OSError):
            stamp_tmp.unlink(missing_ok=True)


def download(
    url: str, dest: Path, source: Source, *, progress: bool = True, expected_sha256: str | None = None
) -> Path:
    """Stream ``url`` into ``dest`` atomically, checking size and hashes; return ``dest``.

    ``expected_sha256``: the digest recorded when this file was first downloaded (a re-fetch
    after corruption must give the same file). Nothing is left behind on failure.
    """
    shown = redact(url)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsUnavailableError(
            f"could not create the weights cache folder {folder} for {shown}: {error}. {_how_to_fix()}"
        ) from error
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise WeightsUnavailableError(f"could not download {shown}: the cache entry {dest} is a folder; remove it")
    remove_stale_partials(dest)
    tmp = _partial_name(dest)
    digest = hashlib.sha256()
    offline_hint = (
        f"Offline? Put {source.file_name} in a folder and set {MIRROR_ENV}=/that/folder (or a base URL that serves it)."
    )
    limits = {"connect_timeout_s": CONNECT_TIMEOUT_S, "read_timeout_s": READ_TIMEOUT_S, "deadline_s": DEADLINE_S}
    bar_options = {"disable": not progress, "unit": "B", "unit_scale": True, "unit_divisor": 1024}
    try:
        with stream(url, max_bytes=MAX_DOWNLOAD_BYTES, **limits) as body:
            _check_length(body, source, folder, shown)
            with open(tmp, "wb") as handle, torch.hub.tqdm(total=body.length, **bar_options) as bar:
                for chunk in body:
                    if source.size_bytes is not None and handle.tell() + len(chunk) > source.size_bytes:
                        raise WeightsUnavailableError(
                            f"downloaded {shown} does not match the manifest: size over {source.size_bytes} bytes, "
                            f"expected {source.size_bytes}"
                        )
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        sha256 = digest.hexdigest()
        problem = _expected_problem(tmp, source, sha256) or format_problem(tmp, source.file_format)
        if problem is None and expected_sha256 not in (None, sha256):
            problem = (
                f"sha256 {sha256}, but {expected_sha256} was recorded when it was first downloaded "
                "(if the publisher really changed the file, delete the cached copy and its .sha256.json)"
            )
        if problem:
            raise WeightsUnavailableError(f"downloaded {shown} does not match the manifest: {problem}")
        _install(tmp, dest, sha256)
        return dest
    except DeadlineError as error:
        raise WeightsUnavailableError(f"download of {shown} took over {DEADLINE_S:g} s; gave up") from error
    except FetchError as error:
        message = f"could not download {shown} to {dest}: {error.reason}. {offline_hint}"
        raise WeightsUnavailableError(message) from error
    except OSError as error:  # disk full, no permission on the cache folder, ...
        message = f"could not write {shown} into {folder}: {error}; nothing was kept. {_how_to_fix()}"
        raise WeightsUnavailableError(message) from error
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def _mirror_folder_file(mirror: str, source: Source) -> Path:
    folder = Path(mirror).expanduser()
    path = folder / source.file_name
    if not os.path.isfile(path):
        if not os.path.isdir(folder):
            why = "; that folder does not exist"
        elif os.path.isdir(path):
            why = "; it is a folder"
        elif os.path.islink(path):
            why = f"; it is a broken symbolic link to {os.readlink(path)}"
        elif os.path.lexists(path):
            why = "; it is not a regular file"
        else:
            why = ""
        raise WeightsUnavailableError(
            f"{MIRROR_ENV}={mirror!r} has no file {source.file_name!r} (looked for {path}{why})"
        )
    # Used in place (never copied); hashed on each load only where the manifest gives something to check.
    if source.sha256 or source.size_bytes is not None or _HASH_IN_NAME.search(source.file_name):
        try:
            problem = _expected_problem(path, source, sha256_of(path))
        except OSError as error:
            raise WeightsUnavailableError(f"{path} (from {MIRROR_ENV}) cannot be read: {error}") from error
        if problem:
            raise WeightsUnavailableError(f"{path} (from {MIRROR_ENV}) does not match the manifest: {problem}")
    return path


def _from_mirror(mirror: str, source: Source, dest: Path, progress: bool, expected: str | None) -> Path:
    if is_url(mirror):
        url = mirror.rstrip("/") + "/" + source.file_name
        return download(url, dest, source, progress=progress, expected_sha256=expected)
    return _mirror_folder_file(mirror, source)


def _same_identity(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_mtime_ns) == (b.st_ino, b.st_dev, b.st_mtime_ns)


def _discard(path: Path, seen: os.stat_result) -> str | None:
    """Delete a corrupt cached file, unless another process has just replaced it; why not, if it could not be.

    Its stamp stays: the re-download must have the SHA-256 recorded at first download.
    """
    try:
        if _same_identity(path.stat(), seen):
            path.unlink()
    except FileNotFoundError:
        return None
    except OSError as error:  # a read-only cache
        return f"could not be deleted ({error})"
    return None


def _cached(dest: Path, source: Source, stamp: dict | None) -> tuple[bool, str | None]:
    """(usable, why a bad entry stays) for the cache entry ``dest`` and its ``stamp``."""
    try:
        seen = dest.stat()
        problem = _cached_problem(dest, seen, source, stamp)
    except FileNotFoundError:  # removed by another process meanwhile, or a broken link
        return False, None
    except OSError as error:
        return False, f"the cached {dest} cannot be read: {error}"
    if problem is None:
        return True, None
    if stat.S_ISDIR(seen.st_mode):
        return False, f"the cache entry {dest} is a folder, not a checkpoint file; remove it"
    log.warning("cached checkpoint %s is corrupt (%s); deleting it", dest, problem)
    not_deleted = _discard(dest, seen)
    return False, (f"the cached {dest} is damaged ({problem}) and {not_deleted}" if not_deleted else None)


def fetch_checkpoint(sources: tuple[Source, ...], *, progress: bool = True) -> tuple[Path, Source]:
    """Path of a verified local copy of the first source that can be had, and that source.

    Order: torch.hub's cache; then ``$RESNEXT_HUB_WEIGHTS_MIRROR`` (a folder or base URL
    holding the files by name) if set, else each source's URL. A corrupt cached file is
    deleted and fetched once more, and must then match the SHA-256 recorded at first download.
    """
    mirror = os.environ.get(MIRROR_ENV)
    failures = []
    recorded: dict[str, str | None] = {}
    # Every source's cache entry before any request: a cached alternative (say the safetensors
    # copy, used once because the primary URL failed) must load offline without retrying the primary.
    for source in sources:
        dest = cache_dir() / source.file_name
        stamp = _read_stamp(dest)  # kept when a damaged file is deleted: its re-download must match it
        recorded[source.file_name] = stamp["sha256"] if stamp else None
        if os.path.lexists(dest):
            usable, note = _cached(dest, source, stamp)
            if usable:
                return dest, source
            if note:
                failures.append(note)
    for source in sources:
        dest = cache_dir() / source.file_name
        try:
            if mirror:
                return _from_mirror(mirror, source, dest, progress, recorded[source.file_name]), source
            return download(
                source.url, dest, source, progress=progress, expected_sha256=recorded[source.file_name]
            ), source
        except WeightsUnavailableError as error:
            failures.append(str(error))
    where = f"{MIRROR_ENV}={redact(mirror)!r}" if mirror else f"{MIRROR_ENV} (unset)"
    raise WeightsUnavailableError(
        "no source of these weights could be used:\n  - "
        + "\n  - ".join(failures)
        + f"\nCache folder: {cache_dir()}; mirror: {where}; or pass pretrained_from_file=PATH."
    )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def forget(path: Path, seen: os.stat_result | None) -> str:
    """Stop trusting ``path``, a fetched checkpoint that could not be read or loaded into its model.

    A cached file (``seen``: its stat when it was read) is deleted with its stamp, so the next load
    fetches it again, unless another process has replaced it since. A mirror folder's file is used
    in place and never deleted, nor is anything outside the cache. Returns a sentence for the error.
    """
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and not is_url(mirror) and _same_path(path, Path(mirror).expanduser() / path.name):
        return f"It is used in place from {MIRROR_ENV}={mirror!r}: replace {path} there with the right file."
    if not _same_path(path.parent, cache_dir()):
        return f"{path} was left as it is."
    stamp = _stamp_path(path)
    try:
        if seen is None or not _same_identity(path.stat(), seen):
            return f"The cached {path} has been replaced meanwhile: the next load checks the new copy."
        path.unlink()
        stamp.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError as error:
        return f"The cached {path} could not be deleted ({error}): delete it and {stamp.name} by hand."
    where = f"{MIRROR_ENV}={redact(mirror)!r}" if mirror else "its URL"
    return (
        f"The cached {path} and its stamp were deleted: the next load downloads it again from {where} "
        "(which served the wrong file: fix that first)."
    )
