"""An OpenVINO IR folder (``model.xml`` + ``model.bin``) in int8, bf16 or fp32, with the class names and preset in
its metadata, verified against the eager model before it is moved into place.

The graph is the one the in-process OpenVINO path builds (:func:`resnext_hub.models.openvino_runtime.openvino_graph`:
``torch.export`` of the exact fp32 copy, any batch and image size); int8 is that graph calibrated once
by the same path as ``--precision int8`` (NNCF on the model's own preset of the ``calibration`` images).
bf16 is the fp32 graph saved with ``precision`` ``bf16`` in its metadata: the loader compiles it with
OpenVINO's bf16 inference hint (IR weights have no bf16 type). The metadata are the ONNX file's keys
(:mod:`.onnx_metadata`) in the IR's ``rt_info``; the loader is :mod:`resnext_hub.models.openvino_ir`, which
verification uses too: what is checked is what the doors load.

Verification: fp32 and bf16 as every float export (:mod:`.checks`: 1e-4 and 5e-2 of the logit scale, same
top-1) on random batches; int8 as the int8 ONNX file (:func:`.onnx_int8.verify_int8`: logit cosine >= 0.99
and the same top-1 where clear) on the calibration images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..console import printable
from ..models import ResNet
from ..models.fused import OptimizedResNet
from ..models.openvino_ir import PRECISIONS, XML_FILE, load_openvino_ir, set_ir_metadata
from ..models.openvino_runtime import openvino_graph
from ..models.quantize import INSTALL_HINT, calibration_batches
from ..processing.atomic import install_folders, staging_folder
from .checks import (
    TOLERANCES,
    TRACE_BATCH,
    VERIFY_BATCHES,
    ExportError,
    ExportResult,
    default_image_size,
    eager_copy,
    example_input,
    verify,
)
from .onnx_int8 import VERIFY_IMAGES, Int8ExportResult, verify_int8
from .onnx_metadata import onnx_metadata

log = logging.getLogger(__name__)


def export_openvino(
    model: ResNet,
    path: str | Path,
    *,
    precision: str = "fp32",
    calibration: Any = None,
    image_size: int | None = None,
    overwrite: bool = False,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write ``model`` as an OpenVINO IR folder ``path`` (``model.xml`` + ``model.bin``) in ``precision``.

    ``calibration`` (int8 only, required there): image paths/URLs/PIL images (preprocessed with the model's
    preset) or preprocessed batches, as ``optimize_for_inference``'s. ``image_size``: what fp32/bf16 are
    verified at (default the preset's crop; the IR takes any size). An existing ``path`` is replaced only
    with ``overwrite``, and only once the new IR is verified; on any failure nothing is left.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"an OpenVINO IR is written in one of {PRECISIONS}, not {precision!r}")
    if (precision == "int8") != (calibration is not None):
        raise ValueError("an int8 IR needs calibration images, and only int8 takes them")
    try:
        import openvino as ov
    except ImportError as error:
        raise ImportError(f"an OpenVINO export needs openvino: {INSTALL_HINT} ({error})") from error
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"{printable(path)} already exists: pass overwrite=True (--overwrite) to replace it")
    size = image_size or default_image_size(model)
    what = f"OpenVINO IR {path.name} ({precision})"
    log.info("converting %s to OpenVINO (%s)", type(model).__name__, precision)
    if precision == "int8":
        batches = calibration_batches(calibration, model.preprocessing)
        size = batches[0].shape[-1]
        graph = model.optimize_for_inference("int8", calibration=batches, int8_backend="openvino").backend_model
    else:
        exact = OptimizedResNet(model, dtype=torch.float32, channels_last=False)
        with torch.no_grad():
            graph = openvino_graph(exact, example_input(TRACE_BATCH, size, seed=0))
    set_ir_metadata(graph, onnx_metadata(model, image_size=size, precision=precision, opset=None))
    with staging_folder(path) as staging:
        folder = staging / path.name
        folder.mkdir()
        # Weights as they are: OpenVINO's default would round float weights to fp16.
        ov.save_model(graph, str(folder / XML_FILE), compress_to_fp16=False)
        loaded = load_openvino_ir(folder)
        if loaded.classes != model.classes or loaded.preprocessing != model.preprocessing:
            raise ExportError(f"{what}: the class names or preset read back differ from the model's")
        if precision == "int8":
            checks = verify_int8(loaded, model, torch.cat(batches)[:VERIFY_IMAGES], what)
            result: ExportResult = Int8ExportResult("openvino", path, precision, size, checks)
        else:
            tolerance = TOLERANCES[precision]
            checks = verify(lambda x: loaded(x).numpy(), eager_copy(model), size, tolerance, verify_batches, what)
            result = ExportResult("openvino", path, precision, size, checks)
        install_folders(staging, path.parent, [path.name], replace=overwrite)
    return result
