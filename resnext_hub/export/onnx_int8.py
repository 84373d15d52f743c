"""An int8 ONNX file (QDQ) for ONNX Runtime, calibrated on the caller's images, verified against the float model.

The float ONNX graph is exported first (:func:`resnext_hub.export.export_onnx`, itself verified to
1e-4) and pre-processed (ONNX Runtime's shape inference and graph optimizations), then
``onnxruntime.quantization.quantize_static`` inserts QuantizeLinear/DequantizeLinear pairs: per-channel
int8 weights, uint8 activations with ranges from the calibration images (MinMax), which go through the
model's own preset and the project's loader exactly as ``optimize_for_inference``'s. The classifier
(``Gemm``) and the softmax stay in fp32: they cost nothing, and a quantized softmax would round the
probabilities to 1/255. The file has the float file's opset and IR version (by default 18 and 8: ONNX
Runtime 1.14 and later) and ``metadata_props`` (:mod:`.onnx_metadata`, with ``precision`` ``int8``).
``reduce_range`` (7-bit weights, for CPUs without VNNI where 8-bit products can saturate) defaults
to whether the exporting CPU lacks int8 dot products.

Verification is looser than the float formats' (int8 cannot match to 1e-4): on ``verify`` images,
by default the calibration images (up to :data:`VERIFY_IMAGES`, batch sizes 1 and the rest), every image's
logit cosine against the eager model must be >= :data:`MIN_COSINE`, and the top-1 class must agree
wherever the eager model's top two logits differ by more than 5% of the logits' spread (a flip
between near-equal logits is rounding, not a change of answer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..models import ResNet
from ..models.cpu import cpu_has_int8_dot
from ..models.quantize import calibration_batches
from .checks import Check, ExportError, ExportResult, default_image_size, staged
from .labels import is_multi_label, output_probabilities
from .onnx_file import INPUT_NAME, OUTPUT_NAMES, export_onnx
from .onnx_metadata import onnx_metadata, set_metadata
from .onnx_versions import DEFAULT_OPSET, check_opset, check_versions, convert

log = logging.getLogger(__name__)

MIN_COSINE = 0.99
VERIFY_IMAGES = 16
CLEAR_MARGIN = 0.05  # of the logits' standard deviation


@dataclass(frozen=True)
class Int8Check(Check):
    """One verification batch of the int8 file: logit cosine and top-1 agreement, not an absolute bound."""

    cosine_min: float = 1.0

    @property
    def passed(self) -> bool:
        return self.cosine_min >= self.tolerance and self.top1_agrees


class Int8ExportResult(ExportResult):
    """An :class:`ExportResult` whose summary gives the int8 checks' cosines."""

    def summary(self) -> str:
        runs = ", ".join(f"batch {c.batch_size}: logit cosine >= {c.cosine_min:.5f}" for c in self.checks)
        kind = "int8 QDQ" if self.format == "onnx" else "int8"
        return f"{self.format} ({kind}, {self.image_size}x{self.image_size}) -> {self.path}; verified {runs}"


def export_onnx_int8(
    model: ResNet,
    path: str | Path,
    *,
    calibration: Any,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    reduce_range: bool | None = None,
    verify: Any = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` as an int8 QDQ ONNX file (same input and outputs as :func:`export_onnx`'s).

    ``calibration``: image paths/URLs/PIL images (preprocessed with the model's preset) or
    preprocessed ``(N, 3, S, S)`` batches at the export size; ``verify``: other images to verify on
    (same forms; default the calibration images). Raises :class:`ExportError` if the file does not
    pass the verification in the module docstring; nothing is left at ``path`` then. An existing file
    is replaced only with ``overwrite``.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise ImportError(f"an int8 ONNX export needs onnxruntime (pip install onnxruntime): {error}") from error
    check_opset(opset)
    path = Path(path)
    size = image_size or default_image_size(model)
    batches = calibration_batches(calibration, model.preprocessing)
    checked = batches if verify is None else calibration_batches(verify, model.preprocessing)
    for what, images in (("calibration", batches), ("verify", checked)):
        if images[0].shape[2:] != (size, size):
            got = "x".join(map(str, images[0].shape[2:]))
            raise ExportError(f"{what} images are {got}, the export is {size}x{size}: give images of the export size")
    reduce_range = not cpu_has_int8_dot() if reduce_range is None else reduce_range

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[torch.Tensor] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch.numpy()}

    # The staging file's private folder holds the intermediate files too.
    with staged(path, f"int8 ONNX export of {type(model).__name__}", overwrite=overwrite) as staging:
        scratch = staging.parent
        float_path = scratch / "float.onnx"
        export_onnx(model, float_path, image_size=size, opset=opset)
        log.info("quantizing %s to int8 (QDQ) on %d calibration images", path.name, sum(len(b) for b in batches))
        try:
            prepared = scratch / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared))
            head = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Gemm", "Softmax")]
            quantize_static(
                str(prepared),
                str(staging),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                nodes_to_exclude=head,
            )
        except Exception as error:  # onnxruntime raises bare Exceptions from its graph passes
            raise ExportError(f"int8 quantization of {path.name} failed: {error}") from error
        # ONNX Runtime's passes stamp their own opset imports and per-node records: back to the float file's versions.
        quantized = convert(onnx.load(str(staging)), opset)
        set_metadata(quantized, onnx_metadata(model, image_size=size, precision="int8", opset=opset))
        onnx.save(quantized, str(staging))
        check_versions(staging, opset, name=path.name)
        checks = verify_onnx_int8(staging, model, torch.cat(checked)[:VERIFY_IMAGES], name=path.name)
    return Int8ExportResult("onnx", path, "int8", size, checks)


def verify_onnx_int8(
    path: str | Path, model: ResNet, images: torch.Tensor, *, name: str | None = None
) -> list[Int8Check]:
    """Run the int8 file with ONNX Runtime (CPU) on ``images`` (batch 1, then the rest) against ``model``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    what = f"int8 ONNX {name or Path(path).name}"

    def run(batch: torch.Tensor) -> np.ndarray:
        logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
        expected = output_probabilities(torch.from_numpy(logits).double(), is_multi_label(model))
        if not np.allclose(probabilities, expected.numpy(), atol=1e-4):
            raise ExportError(f"{what}: the probabilities output is not what the head's logits give")
        return logits

    return verify_int8(run, model, images, what)


def verify_int8(run: Callable[[torch.Tensor], Any], model: ResNet, images: torch.Tensor, what: str) -> list[Int8Check]:
    """Hold an int8 export (``run``: a batch in, logits out) to the module docstring's rule on ``images`` (batch 1,
    then the rest) against ``model``; :class:`ExportError` if it fails."""
    eager = model.eval().float().cpu()
    checks = []
    for batch in (images[:1], images[1:]):
        if not len(batch):
            continue
        with torch.inference_mode():
            want = eager(batch).double()
        got = torch.as_tensor(np.asarray(run(batch))).double()
        if got.shape != want.shape:
            raise ExportError(f"{what} gives shape {tuple(got.shape)}, the eager model {tuple(want.shape)}")
        top2 = want.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN * want.std(dim=1)
        check = Int8Check(
            batch_size=len(batch),
            max_abs_diff=float((got - want).abs().max()),
            logit_scale=float(want.abs().max()),
            tolerance=MIN_COSINE,
            top1_agrees=bool((got.argmax(1) == want.argmax(1))[clear].all()),
            cosine_min=float(F.cosine_similarity(got, want, dim=1).min()),
        )
        log.info("verified %s, batch %d: cosine >= %.5f", what, check.batch_size, check.cosine_min)
        if not check.passed:
            raise ExportError(
                f"{what} is not faithful to the eager model on batch {check.batch_size}: logit cosine "
                f"{check.cosine_min:.5f} (needs >= {MIN_COSINE}), top-1 agrees where clear: {check.top1_agrees}. "
                "Calibrate on more images like the ones it will see"
            )
        checks.append(check)
    return checks
