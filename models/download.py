"""Find a checkpoint file: torch.hub's cache, the Hugging Face cache, a mirror, or a download into torch.hub's cache.

Sources on the Hugging Face Hub are first looked for in an existing Hugging Face cache (:mod:`.hf_cache`), used
in place after the same checks as a download plus the cache's own blob name; ``HF_HUB_OFFLINE=1`` then forbids
any request (a mirror folder is still read).

Downloads stream through :func:`processing.fetch.stream` (connect/read timeouts, a total
deadline that also cuts off a server dripping bytes, short bodies refused; the proxy variables
are honoured) into a private temporary file that is renamed into
place only after its size and hash check out, so an interrupted or concurrent download
never leaves a bad file in the cache: concurrent processes each download to their own
temporary file and the atomic rename makes one of the identical results win. Temporary
files of killed downloads are removed by the next fetch.

Integrity (:mod:`.integrity`): a manifest SHA-256 (or the 8+ hex digits in a timm file name) is
checked on download. Every cached file gets a ``<file>.sha256.json`` stamp (its SHA-256 with its
size and mtime); a load re-checks the cheap size+mtime stamp and re-hashes only when it changed.
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
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
from contextlib import suppress
from pathlib import Path

import torch.hub

from ..processing.atomic import staged
from ..processing.fetch import Body, DeadlineError, FetchError, is_url, redact, stream
from .hf_cache import OFFLINE_ENV, blob_problem, hub_offline, snapshot_path
from .integrity import (
    HASH_IN_NAME,
    cached_problem,
    expected_problem,
    format_problem,
    read_stamp,
    sha256_of,
    stamp_path,
    stamp_text,
)
from .weights import Source

log = logging.getLogger(__name__)

MIRROR_ENV = "RESNEXT_HUB_WEIGHTS_MIRROR"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DEADLINE_S = 3600.0
# Cap on a download whose manifest gives no size (the largest published file is ~200 MB).
MAX_DOWNLOAD_BYTES = 8 << 30
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
    try:
        with staged(stamp_path(dest)) as stamp:  # the stamp is renamed into place after the file
            stamp.write_text(stamp_text(sha256, seen))
            os.replace(tmp, dest)
    except OSError:
        _discard(dest, seen)  # no file without its stamp (only this download's: _discard checks its identity)
        raise


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
        problem = expected_problem(tmp, source, sha256) or format_problem(tmp, source.file_format)
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
    if source.sha256 or source.size_bytes is not None or HASH_IN_NAME.search(source.file_name):
        try:
            problem = expected_problem(path, source, sha256_of(path))
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
        problem = cached_problem(dest, seen, source, stamp)
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


def _from_hf_cache(source: Source, recorded: str | None) -> tuple[Path | None, str | None, str | None]:
    """(the verified file, where it was looked for, why a file found there is refused) for a source on the
    Hugging Face Hub, from the Hugging Face cache; all None for other sources.

    The file is checked as a download would be (the manifest's size and SHA-256, the hash in a timm file
    name, the file's structure, the SHA-256 recorded at first download), and against the blob name the
    cache gives it. It is used in place, hashed on each load, and never deleted (the cache is not ours).
    """
    location = source.hf_location
    if location is None:
        return None, None, None
    path, looked = snapshot_path(*location)
    if path is None:
        return None, looked, None
    try:
        sha256 = sha256_of(path)
        problem = expected_problem(path, source, sha256) or blob_problem(path, sha256)
        problem = problem or format_problem(path, source.file_format)
    except OSError as error:
        problem = f"it cannot be read: {error}"
    if problem is None and recorded not in (None, sha256):
        problem = f"sha256 {sha256}, but {recorded} was recorded when {source.file_name} was first downloaded"
    if problem:
        return None, looked, f"{path} (Hugging Face cache) is not {source.file_name}: {problem}; it was left as it is"
    return path, looked, None


def fetch_checkpoint(sources: tuple[Source, ...], *, progress: bool = True) -> tuple[Path, Source]:
    """Path of a verified local copy of the first source that can be had, and that source.

    Order: torch.hub's cache; the Hugging Face cache (sources on the Hub, see :mod:`.hf_cache`); then
    ``$RESNEXT_HUB_WEIGHTS_MIRROR`` (a folder or base URL holding the files by name) if set, else each
    source's URL. With ``HF_HUB_OFFLINE=1`` nothing is downloaded (a mirror folder is still used). A corrupt
    cached file is deleted and fetched once more, and must then match the SHA-256 recorded at first download.
    """
    mirror = os.environ.get(MIRROR_ENV)
    failures = []
    looked = [str(cache_dir() / source.file_name) for source in sources]
    recorded: dict[str, str | None] = {}
    # Every source's cache entry before any request: a cached alternative (say the safetensors
    # copy, used once because the primary URL failed) must load offline without retrying the primary.
    for source in sources:
        dest = cache_dir() / source.file_name
        stamp = read_stamp(dest)  # kept when a damaged file is deleted: its re-download must match it
        recorded[source.file_name] = stamp["sha256"] if stamp else None
        if os.path.lexists(dest):
            usable, note = _cached(dest, source, stamp)
            if usable:
                return dest, source
            if note:
                failures.append(note)
    for source in sources:
        path, where, note = _from_hf_cache(source, recorded[source.file_name])
        looked += [where] if where else []
        if path is not None:
            return path, source
        if note:
            failures.append(note)
    offline = hub_offline()
    for source in sources:
        dest = cache_dir() / source.file_name
        if offline and (not mirror or is_url(mirror)):
            continue
        try:
            if mirror:
                return _from_mirror(mirror, source, dest, progress, recorded[source.file_name]), source
            return download(
                source.url, dest, source, progress=progress, expected_sha256=recorded[source.file_name]
            ), source
        except WeightsUnavailableError as error:
            failures.append(str(error))
    where = f"{MIRROR_ENV}={redact(mirror)!r}" if mirror else f"{MIRROR_ENV} (unset)"
    if offline:
        raise WeightsUnavailableError(
            f"{OFFLINE_ENV} is set, so nothing was downloaded, and no usable local copy was found. Looked for:\n  - "
            + "\n  - ".join(looked + failures)
            + f"\nMirror: {where}. Put the file in one of these places, set {MIRROR_ENV} to a folder holding it, "
            f"pass pretrained_from_file=PATH, or unset {OFFLINE_ENV} to download it."
        )
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
    stamp = stamp_path(path)
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
