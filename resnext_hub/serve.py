"""Serve a model behind a real Triton Inference Server (PyTriton), with dynamic batching.

Two models are bound on one server, both returning the top-k of each sample as ``labels``
(BYTES), ``probabilities`` (FP32) and ``indices`` (INT64), each of shape ``(k,)``:

- ``<name>``: ``input``, a preprocessed FP32 tensor ``(3, S, S)`` per sample (the model's transform);
- ``<name>_image``: ``image``, the encoded file (BYTES ``(1,)``), decoded by the same hardened loader
  as everything else; a sample that is not a usable image gets its reason in ``error`` (BYTES ``(1,)``)
  and empty top-k, without failing the other requests batched with it.

PyTriton runs the model in this process; Triton's Python-backend stub, which it starts, embeds the
shared ``libpython`` of this interpreter's version. :func:`check_interpreter` checks that first.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .arguments import add_model_options, model_from_args
from .inference import Classifier
from .processing import InvalidImageError, load_image
from .triton import parse_batch_sizes

log = logging.getLogger(__name__)

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


def _ranked(classifier: Classifier, batch: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    rows = classifier.predict_tensor(batch, k)
    return {
        "labels": np.array([[p.label.encode() for p in row] for row in rows], dtype=object).reshape(-1, k),
        "probabilities": np.array([[p.probability for p in row] for row in rows], dtype=np.float32).reshape(-1, k),
        "indices": np.array([[p.index for p in row] for row in rows], dtype=np.int64).reshape(-1, k),
    }


def make_infer_functions(
    classifier: Classifier, k: int = 5
) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """The two batched functions served: ``(input=...)`` and ``(image=...)`` -> top-k arrays."""

    def infer_tensor(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the served tensor's name)
        return _ranked(classifier, torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)), k)

    def infer_image(image: np.ndarray) -> dict[str, np.ndarray]:
        tensors, errors = [], []
        for item in image.reshape(len(image), -1)[:, 0]:
            try:
                tensors.append(classifier.transform(load_image(bytes(item))))
                errors.append(b"")
            except InvalidImageError as error:
                tensors.append(None)
                errors.append(error.reason.encode())
        good = [t for t in tensors if t is not None]
        ranked = _ranked(classifier, torch.stack(good), k) if good else None
        out = {
            "labels": np.full((len(tensors), k), b"", dtype=object),
            "probabilities": np.zeros((len(tensors), k), np.float32),
            "indices": np.full((len(tensors), k), -1, np.int64),
            "error": np.array(errors, dtype=object).reshape(-1, 1),
        }
        rows = [i for i, t in enumerate(tensors) if t is not None]
        if ranked is not None:
            for name in ("labels", "probabilities", "indices"):
                out[name][rows] = ranked[name]
        return out

    return infer_tensor, infer_image


def build_server(
    classifier: Classifier,
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
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    size = classifier.model.preprocessing.crop_size
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
    infer_tensor, infer_image = make_infer_functions(classifier, top_k)
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # PyTriton's serve() stops cleanly on it


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        library = check_interpreter()
    except ServeUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.check:
        print(f"PyTriton can serve with this interpreter: Python {platform.python_version()}, {library}")
        return 0
    model = model_from_args(args)
    classifier = Classifier(model, device=args.device, amp=not args.no_amp, exact=args.exact)
    scratch = Path(tempfile.mkdtemp(prefix="resnext-hub-triton-"))
    try:
        triton = build_server(
            classifier,
            name=args.name or args.model,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=None if args.metrics_port == 0 else args.metrics_port,
            max_batch_size=args.max_batch_size,
            preferred_batch_sizes=args.preferred_batch_sizes,
            queue_delay_us=args.queue_delay_us,
            top_k=args.top_k,
            workspace=scratch / "workspace",
            access_token=os.environ.get(TOKEN_ENV) or None,
        )
        # Both stop the server cleanly; SIGINT explicitly too, since a shell's background job inherits it ignored.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        log.info("serving %s: HTTP %s:%d, gRPC %s:%d", args.model, args.host, args.http_port, args.host, args.grpc_port)
        triton.serve()  # blocks until SIGINT/SIGTERM, then stops the server
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = commands.add_parser(
        "serve",
        help="serve a model with Triton Inference Server (PyTriton): HTTP + gRPC, dynamic batching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, random_weights=True)
    parser.add_argument("--name", help="model name on the server (default: the architecture); images: <name>_image")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics; 0 turns them off")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--preferred-batch-sizes", type=parse_batch_sizes, default=[8, 16], help="e.g. 8,16")
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="how long a request may wait for a batch")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-amp", action="store_true", help="on CUDA, run in fp32 instead of fp16 autocast")
    parser.add_argument("--exact", action="store_true", help="exact fp32 (default: the fastest faithful precision)")
    parser.add_argument("--check", action="store_true", help="only check that PyTriton works with this Python")
    parser.set_defaults(func=cmd_serve)
