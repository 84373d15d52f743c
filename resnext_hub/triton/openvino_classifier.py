"""The Triton classifier as an OpenVINO IR (``export --format triton --classifier openvino``), for Triton's
OpenVINO backend: the contract's ``input`` in, its top-k ``probabilities`` and ``indices`` out.

The IR is :func:`resnext_hub.export.openvino_ir.export_openvino`'s (int8 calibrated once, bf16 or fp32;
verified against the eager model), then given the contract's tensor names, its image size (Triton's
config declares ``[3, S, S]``) and a softmax and top-k at the end, as the ONNX classifier
(:mod:`.classifier`). That last step is checked too: on the verification inputs its top-k must be the
top-k of the verified IR's softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..export.checks import VERIFY_BATCHES, ExportError, ExportResult, verification_inputs
from ..export.openvino_ir import export_openvino
from ..models import ResNet
from ..models.openvino_ir import XML_FILE, OpenVINOResNet, ir_metadata, load_openvino_ir, set_ir_metadata
from ..processing.atomic import staging_folder
from .contract import INDICES, INPUT, PROBABILITIES, Contract


def end_in_top_k(graph: Any, contract: Contract) -> Any:
    """``graph`` (an ``ov.Model`` giving logits) as the contract's classifier: input named ``input``, shaped
    ``(batch, 3, S, S)``; outputs the top-k of the softmax, ``probabilities`` (f32) and ``indices`` (i64)."""
    import openvino as ov

    ops = ov.opset13
    parameter = graph.get_parameters()[0]
    logits = graph.get_results()[0].input_value(0)
    top = ops.topk(
        ops.softmax(logits, 1),
        ops.constant(np.int64(contract.k)),
        axis=-1,
        mode="max",
        sort="value",
        index_element_type=ov.Type.i64,
    )
    results = []
    for index, name in enumerate((PROBABILITIES, INDICES)):
        result = ops.result(top.output(index))
        result.output(0).set_names({name})
        result.set_friendly_name(name)
        results.append(result)
    parameter.output(0).set_names({INPUT})
    parameter.set_friendly_name(INPUT)
    classifier = ov.Model(results, [parameter], contract.name)
    size = contract.image_size
    classifier.reshape({INPUT: ov.PartialShape([-1, 3, size, size])})
    set_ir_metadata(classifier, {**ir_metadata(graph), "image_size": str(size)})
    return classifier


def write_openvino_classifier(
    model: ResNet,
    version: Path,
    contract: Contract,
    *,
    precision: str = "fp32",
    calibration: Any = None,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write the classifier's ``model.xml`` and ``model.bin`` into the version folder ``version``."""
    import openvino as ov

    with staging_folder(version / "ir") as scratch:
        ir = scratch / "ir"
        result = export_openvino(
            model,
            ir,
            precision=precision,
            calibration=calibration,
            image_size=contract.image_size,
            verify_batches=verify_batches,
        )
        full = ov.Core().read_model(str(ir / XML_FILE))
        ov.save_model(end_in_top_k(full, contract), str(version / XML_FILE), compress_to_fp16=False)
        _check_top_k(load_openvino_ir(ir), version / XML_FILE, contract, verify_batches)
    result.path = version / XML_FILE
    return result


def _check_top_k(full: OpenVINOResNet, top: Path, contract: Contract, batches: Sequence[int]) -> None:
    """``top`` answers the top-k of ``full``'s softmax on the verification inputs (ties in any order)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(top), "CPU", full.compile_config)
    for x in verification_inputs(contract.image_size, batches):
        with torch.inference_mode():
            probabilities = full(x).softmax(1).numpy()
        answer = compiled({INPUT: x.numpy()})
        values, indices = answer[PROBABILITIES], answer[INDICES]
        shape = (len(x), contract.k)
        if values.shape != shape or indices.shape != shape or indices.dtype != np.int64:
            raise ExportError(
                f"the OpenVINO classifier answers {values.dtype} {values.shape} and {indices.dtype} {indices.shape} "
                f"on batch {len(x)}; expected float32 and int64 {shape}"
            )
        expected = -np.sort(-probabilities, axis=1)[:, : contract.k]
        picked = np.take_along_axis(probabilities, indices, axis=1)
        if not (np.allclose(values, expected, rtol=0, atol=1e-5) and np.allclose(picked, values, rtol=0, atol=1e-5)):
            raise ExportError(
                f"the OpenVINO classifier's top-{contract.k} differs from the verified IR's on batch {len(x)}"
            )
