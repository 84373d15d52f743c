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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..console import printable
from ..engine import Engine
from ..processing import Prediction
from .bundle import check_interpreter
from .contract import BLANK_INDEX, NUMPY_TYPES, Contract, TensorSpec, answer, encode_labels

# Triton's admin endpoints (statistics, model repository, logging, ...) need this token; PyTriton makes a
# random one when it is unset, which closes them. Read from the environment so it never shows in `ps`.
TOKEN_ENV = "RESNEXT_HUB_TRITON_TOKEN"


def serving_contract(engine: Engine, name: str, top_k: int) -> Contract:
    """The contract ``engine`` is served under: its crop size, its classes, ``top_k`` clamped to them."""
    return Contract(name, engine.preprocessing.crop_size, engine.num_classes, engine.clamp_k(top_k))


def _answer(
    rows: Sequence[list[Prediction] | None], errors: Sequence[str], labels: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Top-k rows as the contract's outputs; a missing row (an unusable image) has its reason in ``errors``."""
    probabilities = np.zeros((len(rows), k), np.float32)
    indices = np.full((len(rows), k), BLANK_INDEX, np.int64)
    for i, row in enumerate(rows):
        for j, prediction in enumerate(row or []):
            probabilities[i, j] = prediction.probability
            indices[i, j] = prediction.index
    return answer(probabilities, indices, labels, errors)


def make_infer_functions(
    engine: Engine, k: int = 5
) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """The two batched functions served: ``(input=...)`` and ``(image=...)`` -> the contract's outputs."""
    labels = encode_labels(engine.classes.names)

    def infer_tensor(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the served tensor's name)
        rows = engine.top_k(torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)), k)
        return _answer(rows, [""] * len(rows), labels, k)

    def infer_image(image: np.ndarray) -> dict[str, np.ndarray]:
        encoded = [bytes(item) for item in image.reshape(len(image), -1)[:, 0]]
        results = list(engine.classify(encoded, batch_size=max(1, len(encoded)), k=k))
        errors = [printable(result.error) if result.error is not None else "" for result in results]
        return _answer([result.predictions for result in results], errors, labels, k)

    return infer_tensor, infer_image


def pytriton_tensor(spec: TensorSpec):
    """PyTriton's ``Tensor`` for one of the contract's inputs or outputs."""
    from pytriton.model_config import Tensor

    dtype = bytes if spec.datatype == "BYTES" else NUMPY_TYPES[spec.datatype]
    return Tensor(name=spec.name, dtype=dtype, shape=spec.dims)


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
    """A PyTriton ``Triton`` with the contract's two models bound (not yet running): ``.run()`` or ``.serve()``.

    ``top_k`` above the class count serves all classes (the outputs' shape says how many).
    ``access_token`` opens Triton's statistics and other admin endpoints to clients sending it
    (header ``triton-access-token``); without one they stay closed."""
    check_interpreter()
    contract = serving_contract(engine, name, top_k)
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

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
    return triton
