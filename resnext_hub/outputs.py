"""Output files: checked before any work, written as the records come, never losing one.

:func:`check_output` says, before a model loads, whether a file can be written at a path;
:func:`write_output` writes records to it (or to stdout) and, should the file fail midway, sends
the rest to stdout. Files are encoded as :mod:`resnext_hub.results` describes. :func:`write_problem`
says why a write failed when the file system is the cause (a full disk, no permission).
:func:`check_folder`, :func:`picture_names` and :func:`write_picture` do the same for pictures written one
per input (``classify --explain``).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from PIL import Image

from .console import printable
from .processing.atomic import staged
from .processing.fetch import is_url
from .results import ENCODING, ERRORS, Record, RecordWriter

MAX_NAME_CHARS = 100


def check_output(path: str | Path, what: str = "--output", *, replaced: bool = False) -> Path:
    """``path`` if a file can be written there, else ``ValueError`` saying why and what to do.

    Checked before any work, so a bad path costs nothing: not a folder, not below a file, the file
    (if it exists) writable, else a folder it can be created in (missing folders are created when it
    is written). ``replaced``: the file is replaced atomically (a new file beside it, renamed over it),
    so it must be a regular file and its folder writable.
    """
    text = str(path)
    path = Path(path)
    shown = printable(text)
    if not text:
        raise ValueError(f"{what} is empty: give a file name")
    if path.is_dir():
        raise ValueError(f"{what} {shown} is a folder: give the path of a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {shown}: {printable(folder)} is a file, not a folder")
    if path.exists():
        if replaced and not path.is_file():
            raise ValueError(f"{what} {shown} is not a regular file (it is replaced when written): give a file path")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{what} {shown} is not writable (permission denied): give another path")
    if (replaced or not path.exists()) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {shown}: no permission to create files in {printable(folder)}: give another path")
    return path


# errno values of a write that found no room: a full disk, a quota, a file-size limit (RLIMIT_FSIZE, FAT's 4 GiB).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is or was raised from (its cause or context, however deep), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_problem(error: BaseException, path: str | Path) -> str | None:
    """Why writing ``path`` failed and what to do, when a file-system fault is behind ``error``; else None.

    Names ``path`` (not the temporary file the fault may name), and says so when the disk is full.
    """
    fault = os_error_in(error)
    if fault is None:
        return None
    shown, reason = printable(path), fault.strerror or str(fault)
    if fault.errno in DISK_FULL:
        return f"writing {shown} failed: the disk is full ({reason}): free some space there, or write to another disk"
    if fault.errno in (errno.EACCES, errno.EPERM):
        return f"writing {shown} failed: permission denied ({reason}): give a path this user may write to"
    if fault.errno == errno.EROFS:
        return f"writing {shown} failed: the file system is read-only: give a path on another one"
    if fault.errno == errno.ENOTDIR:
        return f"writing {shown} failed: a part of the path is a file, not a folder: give another path"
    return f"writing {shown} failed: {reason}"


def open_output(path: str | Path) -> TextIO:
    """``path`` opened to write records (see resnext_hub.results for the encoding); folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", encoding=ENCODING, errors=ERRORS)


def write_output(
    records: Iterable[Record],
    fmt: str,
    path: str | Path | None,
    stdout: TextIO | None = None,
    *,
    multi_label: bool = False,
) -> str | None:
    """Write ``records`` to ``path`` (None: ``stdout``), each as it comes; never lose one to the file.
    ``multi_label``: the records of a multi-label model (CSV gets its ``above_threshold`` column).

    Should ``path`` fail (a full disk, a lost mount), the record being written and all after it go
    to ``stdout`` instead, in the same format. Returns None, or the message that says so (for stderr).
    """
    stdout = stdout or sys.stdout
    records = iter(records)
    if path is None:
        writer = RecordWriter(fmt, stdout, multi_label=multi_label)
        for record in records:
            writer.write(record)
        return None
    written, pending, problem = 0, None, None
    try:
        out = open_output(path)
    except OSError as error:
        out, problem = None, error
    if out is not None:
        writer = RecordWriter(fmt, out, multi_label=multi_label)
        try:
            writer.start()
        except OSError as error:
            problem = error
        for record in records if problem is None else ():  # only the writes' errors are the output's
            try:
                writer.write(record)
            except OSError as error:
                pending, problem = record, error
                break
            written += 1
        try:
            out.close()
        except OSError as error:  # a write the flushes did not report (e.g. on NFS)
            problem = problem or error
    if problem is None:
        return None
    fallback = RecordWriter(fmt, stdout, multi_label=multi_label)
    for record in _chain(pending, records):
        fallback.write(record)
    return (
        f"error: writing {printable(path)} failed ({problem.strerror or problem}) after {written} result(s); "
        "the results from there on are on stdout instead"
    )


def _chain(first: Record | None, rest: Iterator[Record]) -> Iterator[Record]:
    if first is not None:
        yield first
    yield from rest


def check_folder(path: str | Path, what: str) -> Path:
    """``path`` if files can be written in it (it exists as a folder, or can be created), else ``ValueError``
    saying why; checked before any work."""
    text, path = str(path), Path(path)
    shown = printable(text)
    if not text:
        raise ValueError(f"{what} is empty: give a folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {shown} is a file: give a folder (it is created if missing)")
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {shown}: {printable(folder)} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {shown}: no permission to create files in {printable(folder)}: give another folder")
    return path


def _stem(item: str | bytes) -> str:
    """A file-name-safe stem for an input: its file name without the suffix (a URL's last path part, or its host)."""
    if isinstance(item, bytes):
        return "image"
    if is_url(item):
        parts = urlsplit(item)
        name = parts.path.rstrip("/").rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name or (parts.hostname or "")
    else:
        name = Path(item).name
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    # Letters and digits of any script stay; anything else (separators, control characters, undecodable bytes) is "_".
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.encode("utf-8", "replace").decode("utf-8"))
    return safe.strip("._")[:MAX_NAME_CHARS] or "image"


def picture_names(items: Iterable[str | bytes], suffix: str = ".png") -> list[str]:
    """One file name per input, in order, named after it (``photos/cat.jpg`` -> ``cat.png``), none the same: a
    name taken by an earlier input gets ``-2``, ``-3``, ... (compared ignoring case, for case-insensitive disks)."""
    taken: set[str] = set()
    names = []
    for item in items:
        stem = _stem(item)
        name, count = f"{stem}{suffix}", 1
        while name.casefold() in taken:
            count += 1
            name = f"{stem}-{count}{suffix}"
        taken.add(name.casefold())
        names.append(name)
    return names


def write_picture(path: str | Path, picture: Image.Image) -> None:
    """Save ``picture`` as a PNG at ``path`` atomically (``processing.atomic``); folders are created."""
    with staged(path) as staging:
        picture.save(staging, format="PNG")
