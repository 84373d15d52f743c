"""ONNX export (torch's ``torch.export``-based exporter), verified with ONNX Runtime.

The file is opset 18 / IR 8 by default, readable by ONNX Runtime 1.14 and later (:mod:`.onnx_versions`),
and carries its class names and preprocessing in ``metadata_props`` (:mod:`.onnx_metadata`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checks import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    TRACE_BATCH,
    VERIFY_BATCHES,
    Check,
    ExportError,
    ExportResult,
    default_image_size,
    eager_copy,
    example_input,
    quiet,
    staged,
    verify,
)
from .labels import is_multi_label, output_probabilities
from .onnx_metadata import onnx_metadata, set_metadata
from .onnx_versions import DEFAULT_OPSET, EXPORTER_OPSET, check_opset, check_versions, convert

log = logging.getLogger(__name__)

INPUT_NAME = "input"  # (batch, 3, S, S) FP32
OUTPUT_NAMES = ("logits", "probabilities")  # (batch, classes) FP32 each
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


class _Exportable(nn.Module):
    """The ONNX graph's module: logits and probabilities (a multi-label head's: sigmoid), fp16 inside when asked
    (inputs/outputs stay fp32)."""

    def __init__(self, model: nn.Module, *, fp16: bool) -> None:
        super().__init__()
        self.multi_label = is_multi_label(model)
        self.model = model.half() if fp16 else model
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x.half() if self.fp16 else x).float()
        return logits, output_probabilities(logits, self.multi_label)


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    *,
    image_size: int,
    fp16: bool = False,
    batches: Sequence[int] = VERIFY_BATCHES,
    name: str | None = None,
) -> list[Check]:
    """Run ``path`` with ONNX Runtime (CPU) and compare its logits with ``model``'s."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    multi_label = is_multi_label(model)

    def run(x: torch.Tensor) -> np.ndarray:
        logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        expected = output_probabilities(torch.from_numpy(logits), multi_label).numpy()
        if not np.allclose(probabilities, expected, atol=1e-5):
            function = "sigmoid" if multi_label else "softmax"
            raise ExportError(f"{path}: the probabilities output is not {function}(logits)")
        return logits

    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    return verify(run, eager_copy(model), image_size, tolerance, batches, f"ONNX {name or Path(path).name}")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` as ONNX: input ``input`` ``(batch, 3, S, S)`` FP32, outputs ``logits`` and
    ``probabilities`` ``(batch, classes)`` FP32, batch axis dynamic. ``fp16`` computes in half
    precision inside the graph (for GPUs). ``opset``: :data:`~.onnx_versions.MIN_OPSET` to
    :data:`~.onnx_versions.MAX_OPSET` (the default, 18, with IR version 8: ONNX Runtime 1.14 and later);
    the file is read back to check its opset and IR version, and its ``metadata_props`` hold the class names
    and preprocessing (:mod:`.onnx_metadata`). Verified with ONNX Runtime before it is moved into place;
    an existing file is replaced only with ``overwrite``."""
    import onnx

    check_opset(opset)
    path = Path(path)
    size = image_size or default_image_size(model)
    eager = eager_copy(model)
    module = _Exportable(copy.deepcopy(eager), fp16=fp16).eval()
    log.info("exporting ONNX (opset %d, %s) to %s", opset, "fp16" if fp16 else "fp32", path)
    with staged(path, f"ONNX export of {type(model).__name__}", overwrite=overwrite) as staging:
        with warnings.catch_warnings(), quiet(EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")  # the exporter's internal deprecation chatter, not ours to fix
            program = torch.onnx.export(
                module,
                (example_input(TRACE_BATCH, size, 0),),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=max(opset, EXPORTER_OPSET),  # older ones: converted below
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        written = convert(program.model_proto, opset)
        metadata = onnx_metadata(model, image_size=size, precision="fp16" if fp16 else "fp32", opset=opset)
        set_metadata(written, metadata)
        onnx.save(written, str(staging))
        check_versions(staging, opset, name=path.name)
        checks = verify_onnx(staging, eager, image_size=size, fp16=fp16, batches=verify_batches, name=path.name)
    return ExportResult("onnx", path, "fp16" if fp16 else "fp32", size, checks)
