"""``serve``: a model behind a real Triton Inference Server (PyTriton), with dynamic batching.

The two models of the Triton contract (:mod:`.contract`) are bound on one server, generated from it:

- ``<name>``: ``input``, a preprocessed FP32 tensor ``(3, S, S)`` per sample (the model's transform);
- ``<name>_image``: ``image``, the encoded file (BYTES ``(1,)``), decoded by the same hardened loader
  as everything else;

both answering each sample's top-k as ``labels`` (BYTES), ``probabilities`` (FP32) and ``indices``
(INT64), each ``(k,)``, and ``error`` (BYTES ``(1,)``). A sample that is not a usable image (or
that makes decoding or preprocessing raise anything at all) gets its reason in ``error`` and a
blank top-k, without failing the other samples or requests batched with it. ``k`` is the top-k
served: at most the model's class count (``serve`` clamps ``--top-k`` to it). The exported
repository (``export --format triton``) answers the same contract.

PyTriton runs the model in this process; Triton's Python-backend stub, which it starts, embeds the
shared ``libpython`` of this interpreter's version (:func:`.bundle.check_interpreter` checks that first).
Triton listens on loopback ports only: clients reach it through the door (:mod:`.door`), which bounds
each request's size before its body is copied, keeps stalled clients from holding anything, and
finishes the requests in flight when the server stops (:class:`Serving`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..engine import Engine
from ..processing import Prediction
from ..processing.images import max_image_bytes
from .bundle import check_interpreter
from .contract import BLANK_INDEX, NUMPY_TYPES, Contract, TensorSpec, answer, encode_labels
from .door import DRAIN_TIMEOUT_S, GRPC_MESSAGE_CAP, Door
from .local import free_port

# Triton's admin endpoints (statistics, model repository, logging, ...) need this token; PyTriton makes a
# random one when it is unset, which closes them. Read from the environment so it never shows in `ps`.
TOKEN_ENV = "RESNEXT_HUB_TRITON_TOKEN"
HEADER_ALLOWANCE = 1 << 20  # a request's JSON header and per-element lengths, beside its samples' bytes
# After a batch this large, freed heap pages go back to the system (glibc keeps them otherwise).
TRIM_AFTER_BYTES = 16 << 20


def default_max_request_bytes(max_batch_size: int, image_size: int) -> int:
    """The request-size limit sized from the per-sample caps: a full batch of the largest allowed samples.

    A sample is an encoded image of up to :func:`~resnext_hub.processing.images.max_image_bytes` or a
    preprocessed ``(3, S, S)`` FP32 tensor, whichever is larger; bounded by gRPC's message cap.
    """
    sample = max(max_image_bytes(), 3 * image_size * image_size * 4) + 4  # BYTES elements carry a 4-byte length
    return min(max_batch_size * sample + HEADER_ALLOWANCE, GRPC_MESSAGE_CAP)


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere)."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


class _Trim:
    """Releases freed heap pages shortly after a large batch: once PyTriton has dropped the batch's arrays.

    glibc keeps the pages of freed large buffers (in the arenas of the threads that decoded them), so
    without this the process stays at its peak after large requests. A second pass a second later
    catches the arrays PyTriton drops late on a loaded machine (one pass left 76 MiB in a CI run).
    """

    DELAYS_S = (0.5, 1.0)  # the first pass, then the second after it

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None

    def soon(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.cancel()
            self._pending = threading.Timer(self.DELAYS_S[0], self._release)
            self._pending.daemon = True
            self._pending.start()

    def _release(self) -> None:
        _release_freed_memory()
        time.sleep(self.DELAYS_S[1])
        _release_freed_memory()


def serving_contract(engine: Engine, name: str, top_k: int) -> Contract:
    """The contract ``engine`` is served under: its crop size, its classes, ``top_k`` clamped to them (a
    multi-label model's: every label, and its thresholds)."""
    return Contract(name, engine.preprocessing.crop_size, engine.num_classes, engine.clamp_k(top_k), engine.thresholds)


def _answer(
    rows: Sequence[list[Prediction] | None],
    errors: Sequence[str],
    labels: np.ndarray,
    k: int,
    thresholds: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Top-k rows as the contract's outputs; a missing row (an unusable image) has its reason in ``errors``."""
    probabilities = np.zeros((len(rows), k), np.float32)
    indices = np.full((len(rows), k), BLANK_INDEX, np.int64)
    for i, row in enumerate(rows):
        for j, prediction in enumerate(row or []):
            probabilities[i, j] = prediction.probability
            indices[i, j] = prediction.index
    return answer(probabilities, indices, labels, errors, thresholds)


def make_infer_functions(
    engine: Engine, k: int = 5
) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """The two batched functions served: ``(input=...)`` and ``(image=...)`` -> the contract's outputs."""
    labels = encode_labels(engine.classes.names)
    trim = _Trim()

    def infer_tensor(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the served tensor's name)
        rows = engine.top_k(torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)), k)
        return _answer(rows, [""] * len(rows), labels, k, engine.thresholds)

    def infer_image(image: np.ndarray) -> dict[str, np.ndarray]:
        encoded = [bytes(item) for item in image.reshape(len(image), -1)[:, 0]]
        size = sum(len(item) for item in encoded)
        results = list(engine.classify(encoded, batch_size=max(1, len(encoded)), k=k))
        errors = [result.error or "" for result in results]
        if size >= TRIM_AFTER_BYTES:
            trim.soon()
        return _answer([result.predictions for result in results], errors, labels, k, engine.thresholds)

    return infer_tensor, infer_image


def pytriton_tensor(spec: TensorSpec):
    """PyTriton's ``Tensor`` for one of the contract's inputs or outputs."""
    from pytriton.model_config import Tensor

    dtype = bytes if spec.datatype == "BYTES" else NUMPY_TYPES[spec.datatype]
    return Tensor(name=spec.name, dtype=dtype, shape=spec.dims)


class Serving:
    """``serve``'s server: Triton (PyTriton) on loopback ports, behind the door on the public ones.

    :meth:`run` starts Triton, then opens the door; :meth:`stop` closes the door, waiting for the
    requests in flight to be answered, then stops Triton and every process it started.
    """

    def __init__(self, triton, door: Door) -> None:
        self.triton, self.door = triton, door

    def run(self) -> None:
        """Start Triton and wait until its models are ready, then listen on the public ports."""
        try:
            self.triton.run()
            self.door.start()
        except BaseException:
            with contextlib.suppress(Exception):  # the startup's own error is the one to report
                self.triton.stop()
            raise

    def is_alive(self) -> bool:
        return self.triton.is_alive()

    def stop(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Finish the requests in flight (at most ``timeout`` s), then stop Triton."""
        try:
            self.door.stop(timeout)
        finally:
            self.triton.stop()


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
    max_request_bytes: int | None = None,
    workspace: str | Path | None = None,
    access_token: str | None = None,
) -> Serving:
    """The contract's two models on a Triton server behind the door (not yet running): ``.run()``, ``.stop()``.

    ``host``, ``http_port`` and ``grpc_port`` are the door's (clients connect there); Triton itself
    listens on free loopback ports. ``max_request_bytes`` bounds a request's size (default:
    :func:`default_max_request_bytes`). ``top_k`` above the class count serves all classes (the
    outputs' shape says how many). ``access_token`` opens Triton's statistics and other admin
    endpoints to clients sending it (header ``triton-access-token``); without one they stay closed."""
    check_interpreter()
    contract = serving_contract(engine, name, top_k)
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    loopback = "127.0.0.1"
    inner_http, inner_grpc = free_port(), free_port()
    while inner_grpc == inner_http:  # free_port can name one port twice
        inner_grpc = free_port()
    config = TritonConfig(
        http_address=loopback,
        http_port=inner_http,
        grpc_address=loopback,
        grpc_port=inner_grpc,
        allow_metrics=metrics_port is not None,
        metrics_address=host if metrics_port is not None else None,
        metrics_port=metrics_port,
        exit_timeout_secs=5,  # the door has finished the requests in flight before Triton is stopped
        log_verbose=0,
    )
    batching = ModelConfig(
        max_batch_size=max_batch_size,
        batcher=DynamicBatcher(
            preferred_batch_size=[s for s in preferred_batch_sizes if s <= max_batch_size],
            max_queue_delay_microseconds=queue_delay_us,
        ),
    )
    security = TritonSecurityConfig(access_token=access_token)
    triton = Triton(config=config, workspace=workspace, security_config=security)
    for model, infer in zip(contract.models, make_infer_functions(engine, contract.k), strict=True):
        triton.bind(
            model_name=model.name,
            infer_func=batch(infer),
            inputs=[pytriton_tensor(spec) for spec in model.inputs],
            outputs=[pytriton_tensor(spec) for spec in model.outputs],
            config=batching,
            strict=True,
        )
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(max_batch_size, contract.image_size)
    door = Door(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        upstream_http=f"{loopback}:{inner_http}",
        upstream_grpc=f"{loopback}:{inner_grpc}",
        max_request_bytes=max_request_bytes,
    )
    return Serving(triton, door)
