"""Serve a model behind a real Triton Inference Server (PyTriton), with dynamic batching.

Two models are bound on one server, both returning the top-k of each sample as ``labels``
(BYTES), ``probabilities`` (FP32) and ``indices`` (INT64), each of shape ``(k,)``:

- ``<name>``: ``input``, a preprocessed FP32 tensor ``(3, S, S)`` per sample (the model's transform);
- ``<name>_image``: ``image``, the encoded file (BYTES ``(1,)``), decoded by the same hardened loader
  as everything else; a sample that is not a usable image (or that makes decoding or preprocessing
  raise anything at all) gets its reason in ``error`` (BYTES ``(1,)``, one line of UTF-8) and empty
  top-k, without failing the other requests batched with it.

``k`` is the top-k served: at most the model's class count (``serve`` clamps ``--top-k`` to it).

PyTriton runs the model in this process; Triton's Python-backend stub, which it starts, embeds the
shared ``libpython`` of this interpreter's version. :func:`check_interpreter` checks that first.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..engine import Engine
from ..processing import Prediction
from ..results import printable

PROBE_TIMEOUT_S = 30
# Triton's admin endpoints (statistics, model repository, logging, ...) need this token; PyTriton makes a
# random one when it is unset, which closes them. Read from the environment so it never shows in `ps`.
TOKEN_ENV = "RESNEXT_HUB_TRITON_TOKEN"


class ServeUnavailableError(RuntimeError):
    """PyTriton cannot run with this interpreter or platform; the message says why and what to do."""


def _stub_path(version: str) -> Path:
    try:
        import pytriton
    except ImportError as error:
        raise ServeUnavailableError(
            "serving needs PyTriton: pip install nvidia-pytriton (it is in requirements-dev.txt; `make setup`)"
        ) from error
    stubs = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        found = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise ServeUnavailableError(f"PyTriton ships Python-backend stubs for Python {found}, not {version}")
    return stub


def _libpython_of(stub: Path) -> Path | None:
    """The libpython the dynamic loader gives ``stub``, in the environment PyTriton starts it with."""
    from pytriton.utils.distribution import get_libs_path

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH"), str(get_libs_path())]))
    try:
        listing = subprocess.run(
            ["ldd", str(stub)], capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S, check=False
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
    stub = _stub_path(major_minor)
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


def _arrays(rows: Sequence[list[Prediction] | None], k: int) -> dict[str, np.ndarray]:
    """Top-k rows as the served outputs; a missing row (an unusable image) stays empty: b"", 0, -1."""
    out = {
        "labels": np.full((len(rows), k), b"", dtype=object),
        "probabilities": np.zeros((len(rows), k), np.float32),
        "indices": np.full((len(rows), k), -1, np.int64),
    }
    for i, row in enumerate(rows):
        for j, prediction in enumerate(row or []):
            out["labels"][i, j] = prediction.label.encode()
            out["probabilities"][i, j] = prediction.probability
            out["indices"][i, j] = prediction.index
    return out


def make_infer_functions(
    engine: Engine, k: int = 5
) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """The two batched functions served: ``(input=...)`` and ``(image=...)`` -> top-k arrays."""

    def infer_tensor(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the served tensor's name)
        return _arrays(engine.top_k(torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)), k), k)

    def infer_image(image: np.ndarray) -> dict[str, np.ndarray]:
        encoded = [bytes(item) for item in image.reshape(len(image), -1)[:, 0]]
        results = list(engine.classify(encoded, batch_size=max(1, len(encoded)), k=k))
        out = _arrays([result.predictions for result in results], k)
        errors = [printable(result.error).encode() if result.error is not None else b"" for result in results]
        out["error"] = np.array(errors, dtype=object).reshape(-1, 1)
        return out

    return infer_tensor, infer_image


def build_server(
    engine: Engine,
    *,
    name: str,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int | None = 8002,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    top_k: int = 5,
    workspace: str | Path | None = None,
    access_token: str | None = None,
):
    """A PyTriton ``Triton`` with both models bound (not yet running): ``.run()`` or ``.serve()``.

    ``access_token`` opens Triton's statistics and other admin endpoints to clients sending it
    (header ``triton-access-token``); without one they stay closed."""
    check_interpreter()
    top_k = engine.clamp_k(top_k)  # above the class count: all classes (the outputs' shape says how many)
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    size = engine.preprocessing.crop_size
    config = TritonConfig(
        http_address=host,
        http_port=http_port,
        grpc_address=host,
        grpc_port=grpc_port,
        allow_metrics=metrics_port is not None,
        metrics_address=host if metrics_port is not None else None,
        metrics_port=metrics_port,
        exit_timeout_secs=5,  # do not hang 30 s on a client that keeps its connection open
        log_verbose=0,
    )
    batching = ModelConfig(
        max_batch_size=max_batch_size,
        batcher=DynamicBatcher(
            preferred_batch_size=[s for s in preferred_batch_sizes if s <= max_batch_size],
            max_queue_delay_microseconds=queue_delay_us,
        ),
    )
    outputs = [
        Tensor(name="labels", dtype=bytes, shape=(top_k,)),
        Tensor(name="probabilities", dtype=np.float32, shape=(top_k,)),
        Tensor(name="indices", dtype=np.int64, shape=(top_k,)),
    ]
    infer_tensor, infer_image = make_infer_functions(engine, top_k)
    security = TritonSecurityConfig(access_token=access_token)
    triton = Triton(config=config, workspace=workspace, security_config=security)
    triton.bind(
        model_name=name,
        infer_func=batch(infer_tensor),
        inputs=[Tensor(name="input", dtype=np.float32, shape=(3, size, size))],
        outputs=outputs,
        config=batching,
        strict=True,
    )
    triton.bind(
        model_name=f"{name}_image",
        infer_func=batch(infer_image),
        inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
        outputs=[*outputs, Tensor(name="error", dtype=bytes, shape=(1,))],
        config=batching,
        strict=True,
    )
    return triton
