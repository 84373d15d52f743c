"""PyTriton's bundled ``tritonserver``: where its files are, and whether this interpreter can run it.

PyTriton ships the server binary, its libraries and Triton's Python-backend stubs, one per Python
version. The stub embeds the shared ``libpython`` of its version, found by the system's dynamic
loader; :func:`check_interpreter` says whether that library is this interpreter's, before anything
starts. Used by ``serve`` (:mod:`.server`) and by :mod:`.local` (the same binary on any repository).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

PROBE_TIMEOUT_S = 30


class ServeUnavailableError(RuntimeError):
    """PyTriton cannot run with this interpreter or platform; the message says why and what to do."""


def bundle_path() -> Path:
    """PyTriton's ``tritonserver`` folder: ``bin/``, ``backends/``, ``python_backend_stubs/``."""
    try:
        import pytriton
    except ImportError as error:
        raise ServeUnavailableError(
            "serving needs PyTriton: pip install nvidia-pytriton (it is in requirements-dev.txt; `make setup`)"
        ) from error
    return Path(pytriton.__file__).parent / "tritonserver"


def stub_path(version: str) -> Path:
    """The Python-backend stub PyTriton ships for Python ``version`` (``"3.11"``)."""
    stubs = bundle_path() / "python_backend_stubs"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        found = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise ServeUnavailableError(f"PyTriton ships Python-backend stubs for Python {found}, not {version}")
    return stub


def server_environment() -> dict[str, str]:
    """This process's environment with PyTriton's libraries found first, as PyTriton starts the server."""
    from pytriton.utils.distribution import get_libs_path

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH"), str(get_libs_path())]))
    return env


def _libpython_of(stub: Path) -> Path | None:
    """The libpython the dynamic loader gives ``stub``, in the environment PyTriton starts it with."""
    try:
        listing = subprocess.run(
            ["ldd", str(stub)],
            capture_output=True,
            text=True,
            env=server_environment(),
            timeout=PROBE_TIMEOUT_S,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServeUnavailableError(f"could not inspect the Triton stub {stub} with ldd: {error}") from error
    match = re.search(r"(libpython\S+)\s+=>\s+(\S+)", listing)
    if match is None or match.group(2) == "not":
        return None
    return Path(match.group(2))


def _library_version(library: Path) -> str:
    # In a child process: loading a second libpython into this one is not worth the risk.
    probe = (
        "import ctypes, sys\n"
        "get = ctypes.CDLL(sys.argv[1]).Py_GetVersion\n"
        "get.restype = ctypes.c_char_p\n"
        "print(get().decode().split()[0])\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", probe, str(library)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise ServeUnavailableError(f"could not read the Python version of {library}: {error}") from error
    return done.stdout.strip()


def check_interpreter(python_version: str | None = None) -> Path:
    """Return the shared libpython Triton's Python-backend stub will load, if it matches this Python.

    Raises :class:`ServeUnavailableError` where PyTriton cannot work: not Linux, no stub for this
    Python, no shared libpython, or one of another version (e.g. pyenv's 3.11.7 beside Debian's
    3.11.2 library: the stub loads Debian's and fails). ``python_version`` overrides the running
    interpreter's version (for checks on behalf of another interpreter).
    """
    if sys.platform != "linux":
        raise ServeUnavailableError(f"PyTriton runs on Linux only, this is {sys.platform}")
    version = python_version or platform.python_version()
    major_minor = ".".join(version.split(".")[:2])
    stub = stub_path(major_minor)
    library = _libpython_of(stub)
    fix = (
        "Use an interpreter whose shared library is the one the loader finds, e.g. Debian/Ubuntu's "
        "/usr/bin/python3.X with its libpython3.X package (`make setup PYTHON=/usr/bin/python3.11`), "
        "or a build configured with --enable-shared whose lib folder is on LD_LIBRARY_PATH."
    )
    if library is None:
        raise ServeUnavailableError(f"Triton's Python stub needs a shared libpython{major_minor}, none found. {fix}")
    found = _library_version(library)
    if found != version:
        raise ServeUnavailableError(
            f"Triton's Python stub would load {library} (Python {found}), but the interpreter "
            f"({sys.executable if python_version is None else 'checked'}) is Python {version}; "
            f"they must be the same version. {fix}"
        )
    return library
