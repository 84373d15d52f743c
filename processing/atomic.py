"""Files that appear whole or not at all: written beside their final place, then renamed into it.

The one way the project writes a file atomically. A reader never sees half a file, and a failure
(any exception, ``KeyboardInterrupt`` included) leaves the old file, if any, and nothing else.

The file is written in a private temporary folder beside its target (the same file system, so the
rename is atomic), under the target's own name: a writer that records the name it writes (an archive
that names its folder after its file) records the final one, and messages naming ``staging.name``
name the final file. Being created by a plain ``open()``, the file has the mode ``open()`` gives
under the process's umask (``tempfile.mkstemp``'s files are 0600: unreadable to another user, such as
a Triton container's).

``replace=False`` never replaces: the file is linked into place only if nothing is there yet
(``FileExistsError`` otherwise, the staged file removed). :func:`install_folders` moves staged
folders into place the same way, each swapped in one rename with the old one kept until then.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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
def staged(path: str | Path, *, fsync: bool = False, replace: bool = True) -> Iterator[Path]:
    """Where to write ``path``: ``<a private folder beside it>/<its name>``. If the block succeeds, what was
    written there becomes ``path`` (flushed to disk first with ``fsync``); whatever happens, the folder
    is gone afterwards. The folder is the caller's: scratch files may go beside the staged one. A folder
    made there (a format that is a folder of files) replaces an existing ``path`` whole, as
    :func:`install_folders` does (``fsync`` applies to files only).

    ``replace=False``: an existing ``path`` (one made meanwhile too) is left as it is and
    ``FileExistsError`` raised instead."""
    path = Path(path)
    with staging_folder(path) as folder:
        staging = folder / path.name
        yield staging
        if fsync and not staging.is_dir():
            with open(staging, "rb+") as handle:
                os.fsync(handle.fileno())
        if staging.is_dir() and not staging.is_symlink():  # a folder written there: swapped in whole
            install_folders(folder, path.parent, [path.name], replace=replace)
        elif replace:
            os.replace(staging, path)
        else:
            _link_new(staging, path)


def _link_new(staging: Path, path: Path) -> None:
    """``staging`` at ``path`` too, unless something is there: a hard link is made only where no name exists."""
    try:
        os.link(staging, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
    except OSError:  # a file system without hard links: check, then rename (a small window)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
        os.replace(staging, path)


def install_folders(staging: Path, destination: Path, names: Iterable[str], *, replace: bool = False) -> None:
    """Move the folders ``staging/<name>`` to ``destination/<name>``, each in one rename.

    An existing ``destination/<name>`` is refused (``FileExistsError``, nothing moved) unless
    ``replace``; then it is first renamed into ``staging`` (removed with it), so that it stays whole
    until its replacement is in place. Any failure or interruption on the way puts back every old
    folder and takes out every new one: the destination is left as it was.
    """
    names = list(names)
    taken = [name for name in names if os.path.lexists(destination / name)]
    if taken and not replace:
        raise FileExistsError(errno.EEXIST, "already exists", str(destination / taken[0]))
    old = Path(tempfile.mkdtemp(prefix=".old.", dir=staging))
    moved_aside: list[str] = []
    installed: list[str] = []
    try:
        for name in names:
            if os.path.lexists(destination / name):
                os.replace(destination / name, old / name)
                moved_aside.append(name)
            os.replace(staging / name, destination / name)
            installed.append(name)
    except BaseException:
        for name in installed:
            os.replace(destination / name, staging / name)
        for name in moved_aside:
            os.replace(old / name, destination / name)
        raise


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
