"""Files already in a Hugging Face Hub cache, found by reading its on-disk layout (no network, no huggingface_hub).

The layout (huggingface_hub's ``file_download.py``): ``<cache>/models--<org>--<name>/refs/<revision>`` holds a
commit hash, and ``snapshots/<commit>/<file>`` is the file, usually a symbolic link to ``blobs/<id>``, where the
blob's name is its content's SHA-256 for large (LFS) files and git's blob SHA-1 for small ones. The cache folder
and the offline switch follow huggingface_hub's ``constants.py``: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``); ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
set to 1/ON/YES/TRUE.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

OFFLINE_ENV = "HF_HUB_OFFLINE"
_OFFLINE_ENVS = (OFFLINE_ENV, "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network at all."""
    return any((os.environ.get(name) or "").strip().upper() in _TRUE for name in _OFFLINE_ENVS)


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, as huggingface_hub finds it."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def repo_folder(repo_id: str) -> Path:
    """The cache folder of the model repo ``<org>/<name>``."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def snapshot_path(repo_id: str, revision: str, file_name: str) -> tuple[Path | None, str]:
    """(the cached file or None, where it was looked for) for ``file_name`` of ``repo_id`` at ``revision``.

    A branch or tag is resolved through ``refs/<revision>``; a commit hash names its snapshot directly.
    """
    folder = repo_folder(repo_id)
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = folder / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None, f"{ref} (no such ref)"
        if not _COMMIT.fullmatch(commit):
            return None, f"{ref} (holds {commit[:60]!r}, not a commit hash)"
    path = folder / "snapshots" / commit / file_name
    return (path if path.is_file() else None), str(path)


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's object id, not security)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def blob_problem(path: Path, sha256: str) -> str | None:
    """Why the cached ``path`` (whose SHA-256 is ``sha256``) is not the blob its cache entry names, or None.

    The cache names each blob by its content hash (SHA-256 for LFS files, git's SHA-1 for others): a file
    replaced or damaged in place no longer matches its name. A snapshot file that is no link (a cache
    written without symbolic links) has no name to check.
    """
    blob = Path(os.path.realpath(path))
    if blob == Path(os.path.abspath(path)):
        return None
    name = blob.name
    if _SHA256.fullmatch(name) and name != sha256:
        return f"its content's sha256 is {sha256}, but the cache stores it as blob {name} (the file was changed)"
    if _COMMIT.fullmatch(name) and _git_blob_sha1(path) != name:
        return f"its content is not git blob {name}, which the cache stores it as (the file was changed)"
    return None
