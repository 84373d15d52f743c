"""Run the ``tritonserver`` that PyTriton ships on a model repository of your own.

PyTriton bundles the server binary, its libraries and Python-backend stubs per Python version, and
normally starts them for the models it binds in-process (:mod:`.server`). This starts the same
binary on any repository, set up the way PyTriton sets it up (:mod:`.bundle`): the stub that
matches this interpreter (checked by :func:`.bundle.check_interpreter`) beside the Python backend's
library in a backend folder, PyTriton's libraries on ``LD_LIBRARY_PATH``, and this environment's
``bin`` first on ``PATH`` so the embedded interpreter finds this environment's packages.

That bundle has the Python backend only (no ONNX Runtime, TensorRT or PyTorch backends): it serves
Python-backend models and ensembles of them, which is what the tests use it for.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .bundle import bundle_path, check_interpreter, server_environment, stub_path

START_TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def backend_folder(destination: Path) -> Path:
    """Fill ``destination/python/`` with the Python backend and this interpreter's stub; return ``destination``."""
    check_interpreter()
    bundled = bundle_path() / "backends" / "python"
    folder = destination / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(bundled / name, folder / name)
    major_minor = ".".join(platform.python_version().split(".")[:2])
    shutil.copy2(stub_path(major_minor), folder / "triton_python_backend_stub")
    return destination


def _environment() -> dict[str, str]:
    """PyTriton's environment for the server, with this environment's interpreter found first on ``PATH``."""
    env = server_environment()
    env["PATH"] = f"{Path(sys.exec_prefix) / 'bin'}:{env.get('PATH', '')}"
    return env


class LocalTritonServer:
    """``tritonserver`` on ``repository`` at 127.0.0.1 (explicit model control: :meth:`load` the models).

    Use as a context manager; ``log_path`` collects the server's output. Runs in a temporary working
    directory, so the stub's ``sys.path`` (which starts with it) holds nothing of the caller's.
    """

    def __init__(self, repository: str | Path, *, log_path: str | Path, start_timeout_s: float = START_TIMEOUT_S):
        self.repository = Path(repository).resolve()
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self._log: IO[str] | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def argv(self, backends: Path) -> list[str]:
        """The server's command line, with the backend folder :func:`backend_folder` made."""
        shm_prefix = f"resnexthub{os.getpid()}-{secrets.token_hex(4)}"  # unique: servers may run side by side
        return [
            str(bundle_path() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--model-control-mode=explicit",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]

    def __enter__(self) -> LocalTritonServer:
        import tritonclient.http as httpclient

        self._workdir = tempfile.TemporaryDirectory(prefix="resnext-hub-triton-")
        workdir = Path(self._workdir.name)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            self.argv(backend_folder(workdir / "backends")),
            cwd=workdir,
            env=_environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        client = httpclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.is_server_live():
                        return self
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"tritonserver not live after {self.start_timeout_s} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def load(self, names: Sequence[str]) -> dict[str, float]:
        """Load each model (an ensemble after the models it runs); returns the seconds each load took."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.url, network_timeout=self.start_timeout_s)
        seconds = {}
        try:
            for name in names:
                start = time.perf_counter()
                client.load_model(name)
                seconds[name] = time.perf_counter() - start
        finally:
            client.close()
        return seconds

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-characters:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 60 s; returns the exit status."""
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return status

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
