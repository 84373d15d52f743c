"""Export a model to ONNX, TorchScript, an AOTInductor package (pt2), a Triton model repository or a folder in
timm's Hugging Face format (hf), verified.

Every export is written to a temporary name, run by its own runtime (ONNX Runtime; ``torch.jit.load``;
for pt2 a fresh Python process that cannot import this repository) on batches of sizes other than the
one it was traced with, and compared with the eager model; only a file that passes is moved to its
final name. Tolerance: ``max |exported - eager| <= tol * max(1, max |eager|)`` on the logits (the scale
term keeps the bound meaningful for large logits), with ``tol`` 1e-4 for fp32, 2e-2 for fp16 and 5e-2
for bf16, and the top-1 class must agree.

ONNX files are opset 18 with IR version 8 unless ``--opset`` says otherwise (ONNX Runtime 1.14 and later
read them; checked after writing) and carry their class names and preprocessing in ``metadata_props``
(docs/onnx.md).

Which format for what: ONNX for ONNX Runtime, TensorRT and Triton (the repository); an OpenVINO IR
(:mod:`.openvino_ir`, int8/bf16/fp32) for OpenVINO's runtime and every command here (``--checkpoint``); pt2 for C++ or
Python without this source code; TorchScript only for deployments that already load it; hf for timm and the
Hugging Face Hub (:mod:`.hf_folder`, read back with ``pretrained_from_file``). The Triton
repository is written by :func:`resnext_hub.triton.repository.export_triton` (it builds on
:func:`export_onnx`, so this package does not import it).

``python -m resnext_hub export --help`` for the command line (:mod:`resnext_hub.commands.export`).
"""

from .checks import (
    BF16_TOLERANCE,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    TRACE_BATCH,
    VERIFY_BATCHES,
    Check,
    ExportError,
    ExportResult,
    default_image_size,
)
from .hf_folder import export_hf, verify_hf
from .onnx_file import export_onnx, verify_onnx
from .onnx_metadata import onnx_metadata
from .onnx_versions import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from .pt2_package import PRECISIONS as PT2_PRECISIONS
from .pt2_package import export_pt2, run_isolated, verify_pt2
from .torchscript_file import export_torchscript, verify_torchscript

FORMATS = ("onnx", "torchscript", "pt2", "triton", "hf", "openvino")

__all__ = [
    "BF16_TOLERANCE",
    "DEFAULT_OPSET",
    "FORMATS",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "MAX_OPSET",
    "MIN_OPSET",
    "PT2_PRECISIONS",
    "TRACE_BATCH",
    "VERIFY_BATCHES",
    "Check",
    "ExportError",
    "ExportResult",
    "default_image_size",
    "export_hf",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "onnx_metadata",
    "run_isolated",
    "verify_hf",
    "verify_onnx",
    "verify_pt2",
    "verify_torchscript",
]
