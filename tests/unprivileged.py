"""Permission cases for tests that run as root, whom no permission bit stops.

A command meant to meet a permission error runs as ``nobody`` (uid/gid 65534) when the tests run as
root, and as the test's own user otherwise (the bits then apply to it already). What it touches
must be reachable by that user: :func:`public_dir` makes a folder under /tmp that anyone may enter
(pytest's own tmp_path, below a 0700 folder of root's, is not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NOBODY = 65534


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def run_unprivileged(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv)`` as nobody when this process is root; text output captured."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 240)
    preexec = _drop_privileges if os.geteuid() == 0 else None
    return subprocess.run(argv, preexec_fn=preexec, **kwargs)  # noqa: PLW1509 (no threads hold locks here)


@contextmanager
def public_dir(prefix: str = "resnext-hub-test-") -> Iterator[Path]:
    """A fresh folder under /tmp that any user may enter and write in; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        for root, folders, _ in os.walk(folder):  # top-down: give back what a test took away, then enter
            for name in folders:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(folder, ignore_errors=True)
