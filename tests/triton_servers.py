"""Real Triton servers for the tests: ``serve`` in a subprocess, and an exported repository on PyTriton's server.

PyTriton's bundled ``tritonserver`` (resnext_hub.triton.local) has Triton's Python backend but not its
ONNX Runtime backend, so :func:`served_repository` swaps the exported classifier for a Python stand-in
that runs the same ``model.onnx`` with onnxruntime (triton_onnx_standin.py); every other model is
served exactly as the export wrote it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tritonclient.http as httpclient
from conftest import ROOT
from tritonclient.grpc import model_config_pb2

from resnext_hub.triton.config import config_text, model_roles
from resnext_hub.triton.contract import Contract
from resnext_hub.triton.local import free_port
from resnext_hub.triton.server import TOKEN_ENV
from resnext_hub.triton.validation import model_kind, read_config, validate_repository

START_TIMEOUT_S = 180
TOKEN = "test-token-for-admin-endpoints"
STANDIN = Path(__file__).resolve().parent / "triton_onnx_standin.py"


class ServeProcess:
    """``python -m resnext_hub serve`` in a subprocess, as a user starts it; ready when both models are."""

    def __init__(
        self,
        arch: str,
        checkpoint: Path,
        log_path: Path,
        *,
        top_k: int,
        launcher: tuple[str, ...] = ("-m", "resnext_hub"),
        name: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.name = name or arch
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.http_port}"
        argv = [sys.executable, *launcher, "serve", "--model", arch, "--checkpoint", str(checkpoint)]
        argv += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--metrics-port", "0"]
        argv += ["--name", self.name] if name else []
        # A long queue delay makes batching certain however slowly this machine runs the requests.
        argv += ["--max-batch-size", "8", "--preferred-batch-sizes", "4,8", "--queue-delay-us", "200000"]
        # Exact fp32 on both sides: bf16 may swap near-tied classes of random weights.
        argv += ["--top-k", str(top_k), "--device", "cpu", "--precision", "fp32", *options]
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, TOKEN_ENV: TOKEN}
        # A session of its own: every process serve starts can be found (and must be gone after it).
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.http = httpclient.InferenceServerClient(self.url, concurrency=8)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{log}")
            try:
                if self.http.is_model_ready(self.name) and self.http.is_model_ready(f"{self.name}_image"):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_path.read_text()[-3000:]}")

    def session(self) -> dict[int, str]:
        """The processes of serve's session (serve, tritonserver, the stubs, ...): pid -> name."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == self.process.pid:
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except (ProcessLookupError, FileNotFoundError):  # ended meanwhile
                pass
        return found

    def statistics(self, model: str) -> dict:
        return self.http.get_inference_statistics(model, headers={"triton-access-token": TOKEN})["model_stats"][0]

    def stop(self) -> int:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -9
        finally:
            self.log.close()


def served_repository(exported: Path, destination: Path, contract: Contract, *, slow_preprocess: bool = False) -> Path:
    """A copy of an exported repository that PyTriton's server runs: the stand-in classifier, one instance each.

    ``slow_preprocess``: the preprocessing model waits up to 1 s for a batch, with no preferred sizes,
    so requests sent together form one batch. Returns the copy, validated.
    """
    shutil.copytree(exported, destination)
    roles = model_roles(contract)
    for folder in destination.iterdir():
        config = read_config(folder / "config.pbtxt")
        if folder.name == roles["classifier"]:
            config.platform, config.backend = "", "python"
            shutil.copyfile(STANDIN, folder / "1" / "model.py")
        if model_kind(config) != "ensemble":
            del config.instance_group[:]
            config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
        if slow_preprocess and folder.name == roles["preprocess"]:
            config.dynamic_batching.ClearField("preferred_batch_size")
            config.dynamic_batching.max_queue_delay_microseconds = 1_000_000
        (folder / "config.pbtxt").write_text(config_text(config))
    validate_repository(destination)
    return destination


def load_order(configs: dict) -> list[str]:
    """The models of a repository, ensembles last (explicit model control loads them in this order)."""
    return sorted(configs, key=lambda name: (model_kind(configs[name]) == "ensemble", name))


def memory(pid: int) -> dict[str, int]:
    """A process's resident memory from /proc/<pid>/status, in bytes: VmRSS, RssAnon, RssFile, RssShmem."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields
