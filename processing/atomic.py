"""Files that appear whole or not at all: written beside their final place, then renamed into it.

The one way the project writes a file atomically. A reader never sees half a file, and a failure
(any exception, ``KeyboardInterrupt`` included) leaves the old file, if any, and nothing else.

The file is written in a private temporary folder beside its target (the same file system, so the
rename is atomic), under the target's own name: what records the name it writes (``torch.jit.save``'s
archive folder, AOTInductor's package) records the final one, and messages naming ``staging.name``
name the final file. Being created by a plain ``open()``, the file has the mode ``open()`` gives
under the process's umask (``tempfile.mkstemp``'s files are 0600: unreadable to another user, such as
a Triton container's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

STAGING_SUFFIX = ".tmp"


@contextmanager
def staging_folder(beside: str | Path) -> Iterator[Path]:
    """A new private folder in ``beside``'s folder (created if missing), named ``.<name>.<random>.tmp``;
    removed with everything in it when the block ends, however it ends."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=STAGING_SUFFIX, dir=beside.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Where to write ``path``: ``<a private folder beside it>/<its name>``. If the block succeeds, what was
    written there replaces ``path`` (flushed to disk first with ``fsync``); whatever happens, the folder
    is gone afterwards. The folder is the caller's: scratch files may go beside the staged one."""
    path = Path(path)
    with staging_folder(path) as folder:
        staging = folder / path.name
        yield staging
        if fsync:
            with open(staging, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, path)


@contextmanager
def open_atomic(path: str | Path, mode: str = "w", *, fsync: bool = False, **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` of a :func:`staged` file: ``path`` is replaced when the block succeeds."""
    if not mode.startswith("w"):
        raise ValueError(f"open_atomic writes a new file: mode must start with 'w', got {mode!r}")
    with staged(path, fsync=fsync) as staging, open(staging, mode, **kwargs) as handle:
        yield handle


def write_atomic(path: str | Path, data: bytes | str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically (:func:`staged`)."""
    if isinstance(data, bytes):
        with open_atomic(path, "wb", fsync=fsync) as handle:
            handle.write(data)
    else:
        with open_atomic(path, "w", fsync=fsync, encoding=encoding) as handle:
            handle.write(data)
