"""The repository's classifier: the verified ONNX export, ending in top-k.

:func:`write_classifier` exports the model with :func:`resnext_hub.export.export_onnx` (verified
against the eager model as every ONNX file is), then appends one ONNX ``TopK`` to its softmax: the
graph answers the contract's ``probabilities`` (FP32) and ``indices`` (INT64), ``(batch, k)``,
best first. Plain numeric operators, so ONNX Runtime and TensorRT both run it; the labels are
added by the Python-backend postprocessing model (:mod:`.repository`). The appended graph is run
with ONNX Runtime and must give exactly the top-k of the verified graph's probabilities. It keeps the
export's opset, IR version (by default 18 and 8: ONNX Runtime 1.14 and later, as in older Triton
containers) and ``metadata_props`` (:mod:`resnext_hub.export.onnx_metadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from ..export.checks import VERIFY_BATCHES, ExportError, ExportResult, verification_inputs
from ..export.onnx_file import INPUT_NAME, OUTPUT_NAMES, export_onnx
from ..export.onnx_versions import DEFAULT_OPSET, check_versions
from .contract import INDICES, INPUT, PROBABILITIES, Contract

MIN_TOPK_OPSET = 10  # TopK takes k as an input from opset 10


def _names_used(graph) -> set[str]:
    used = {value.name for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        used.update(node.input)
        used.update(node.output)
    return used


def _rename(graph, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (the graphs exported here have no subgraphs)."""
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _free(graph, name: str) -> str:
    """A name not used in ``graph``, starting with ``name``."""
    used = _names_used(graph)
    candidate, number = name, 1
    while candidate in used:
        candidate, number = f"{name}_{number}", number + 1
    return candidate


def end_in_top_k(model, k: int):
    """``model`` (an ``onnx.ModelProto`` from :func:`export_onnx`) answering the top-``k`` of its probabilities.

    The input is renamed to the contract's ``input``; the outputs become ``probabilities`` and ``indices``.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    renamed = {}  # the export's tensors named like the contract's get other names first
    for name in (INPUT, PROBABILITIES, INDICES):
        if name in _names_used(graph):
            renamed[name] = _free(graph, f"exported_{name}")
            _rename(graph, name, renamed[name])
    _rename(graph, renamed.get(INPUT_NAME, INPUT_NAME), INPUT)
    softmax = renamed.get(OUTPUT_NAMES[1], OUTPUT_NAMES[1])
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    count = _free(graph, "top_k_count")
    graph.initializer.append(helper.make_tensor(count, TensorProto.INT64, [1], [k]))
    graph.node.append(
        helper.make_node(
            "TopK", [softmax, count], [PROBABILITIES, INDICES], name=_free(graph, "top_k"), axis=-1, largest=1, sorted=1
        )
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info(INDICES, TensorProto.INT64, [batch, k]),
        ]
    )
    onnx.checker.check_model(model)
    return model


def _check_top_k(full: Path, top: Path, contract: Contract, batches: Sequence[int]) -> None:
    """``top`` gives exactly the top-k of ``full``'s probabilities on the verification inputs."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    full_run = onnxruntime.InferenceSession(str(full), providers=providers)
    top_run = onnxruntime.InferenceSession(str(top), providers=providers)
    for x in verification_inputs(contract.image_size, batches):
        (probabilities,) = full_run.run([OUTPUT_NAMES[1]], {INPUT_NAME: x.numpy()})
        values, indices = top_run.run([PROBABILITIES, INDICES], {INPUT: x.numpy()})
        expected = -np.sort(-probabilities, axis=1)[:, : contract.k]
        shape = (len(x), contract.k)
        if values.shape != shape or indices.shape != shape or values.dtype != np.float32 or indices.dtype != np.int64:
            raise ExportError(
                f"the Triton classifier answers {values.dtype} {values.shape} and {indices.dtype} {indices.shape} "
                f"on batch {len(x)}; expected float32 and int64 {shape}"
            )
        picked = np.take_along_axis(probabilities, indices, axis=1)
        if not (np.allclose(values, expected, rtol=0, atol=1e-6) and np.allclose(picked, values, rtol=0, atol=1e-6)):
            raise ExportError(
                f"the Triton classifier's top-{contract.k} differs from the verified ONNX graph's on batch {len(x)}"
            )


def write_classifier(
    model: nn.Module,
    path: str | Path,
    contract: Contract,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write the classifier's ``model.onnx`` at ``path``: ``input`` in, top-k ``probabilities`` and ``indices`` out.

    The result carries the ONNX export's checks against the eager model.
    """
    import onnx

    if opset < MIN_TOPK_OPSET:
        raise ExportError(f"the Triton classifier needs --opset {MIN_TOPK_OPSET} or later (TopK), got {opset}")
    path = Path(path)
    full = path.with_name(f".{path.name}.full")
    try:
        result = export_onnx(
            model, full, image_size=contract.image_size, fp16=fp16, opset=opset, verify_batches=verify_batches
        )
        onnx.save(end_in_top_k(onnx.load(str(full)), contract.k), str(path))
        check_versions(path, opset)
        _check_top_k(full, path, contract, verify_batches)
    finally:
        full.unlink(missing_ok=True)
    return ExportResult("onnx", path, result.dtype, result.image_size, result.checks)
