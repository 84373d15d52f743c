"""Export a model to ONNX, TorchScript or a Triton model repository, verified before it is done.

Every export is written to a temporary name, run (ONNX Runtime, ``torch.jit.load``) on batches of
sizes other than the one it was traced with, and compared with the eager model; only a file that
passes is moved to its final name. Tolerance: ``max |exported - eager| <= tol * max(1, max |eager|)``
on the logits (the scale term keeps the bound meaningful for large logits), with ``tol`` 1e-4 for
fp32 and 2e-2 for fp16, and the top-1 class must agree.

``python -m resnext_hub export --help`` for the command line (:mod:`resnext_hub.commands.export`).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import triton as triton_config
from .models import ResNet
from .models.meta import Described

log = logging.getLogger(__name__)

DEFAULT_OPSET = 23
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
TRACE_BATCH = 2
VERIFY_BATCHES = (1, 3)
FORMATS = ("onnx", "torchscript", "triton")
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


class ExportError(RuntimeError):
    """An export could not be written, or the written file does not match the eager model."""


@dataclass(frozen=True)
class Check:
    """One verification run: the exported file against the eager model on one batch."""

    batch_size: int
    max_abs_diff: float
    logit_scale: float
    tolerance: float
    top1_agrees: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.logit_scale) and self.top1_agrees


@dataclass
class ExportResult:
    """What was written and how it was verified."""

    format: str
    path: Path
    dtype: str
    image_size: int
    checks: list[Check] = field(default_factory=list)

    def summary(self) -> str:
        runs = ", ".join(
            f"batch {c.batch_size}: max|diff| {c.max_abs_diff:.2e} (logits up to {c.logit_scale:.3g})"
            for c in self.checks
        )
        return f"{self.format} ({self.dtype}, {self.image_size}x{self.image_size}) -> {self.path}; verified {runs}"


class _Exportable(nn.Module):
    """The ONNX graph's module: logits and probabilities, fp16 inside when asked (inputs/outputs stay fp32)."""

    def __init__(self, model: nn.Module, *, fp16: bool) -> None:
        super().__init__()
        self.model = model.half() if fp16 else model
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x.half() if self.fp16 else x).float()
        return logits, logits.softmax(1)


@contextmanager
def _quiet(names: Sequence[str]):
    """Raise these loggers to WARNING for the block: the exporter logs every graph pass at INFO."""
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def default_image_size(model: nn.Module) -> int:
    """The crop size the model's weights expect (224 for a module that is not one of ours)."""
    return model.preprocessing.crop_size if isinstance(model, Described) else 224


def _eager_copy(model: nn.Module) -> nn.Module:
    # A CPU fp32 copy: the caller's model keeps its device, dtype and memory format.
    return copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()


def _inputs(batch_size: int, image_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


def _verify(run, eager: nn.Module, image_size: int, tolerance: float, batches: Sequence[int], what: str) -> list[Check]:
    checks = []
    for seed, batch in enumerate(batches, 1):
        x = _inputs(batch, image_size, seed)
        with torch.inference_mode():
            expected = eager(x).numpy().astype(np.float64)
        exported = np.asarray(run(x))
        if exported.shape != expected.shape:
            raise ExportError(f"{what} gives shape {exported.shape} on batch {batch}, the eager model {expected.shape}")
        check = Check(
            batch_size=batch,
            max_abs_diff=float(np.abs(exported - expected).max()),
            logit_scale=float(np.abs(expected).max()),
            tolerance=tolerance,
            top1_agrees=bool((exported.argmax(1) == expected.argmax(1)).all()),
        )
        log.info("verified %s, batch %d: max |diff| %.2e", what, batch, check.max_abs_diff)
        if not check.passed:
            raise ExportError(
                f"{what} does not match the eager model on batch {batch}: max |diff| {check.max_abs_diff:.3g} "
                f"> {tolerance:g} x max(1, {check.logit_scale:.3g}), top-1 agrees: {check.top1_agrees}"
            )
        checks.append(check)
    return checks


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

    def run(x: torch.Tensor) -> np.ndarray:
        logits, probabilities = session.run(list(triton_config.OUTPUT_NAMES), {triton_config.INPUT_NAME: x.numpy()})
        if not np.allclose(probabilities, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-5):
            raise ExportError(f"{path}: the probabilities output is not softmax(logits)")
        return logits

    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    return _verify(run, _eager_copy(model), image_size, tolerance, batches, f"ONNX {name or Path(path).name}")


def verify_torchscript(
    path: str | Path,
    model: nn.Module,
    *,
    image_size: int,
    batches: Sequence[int] = VERIFY_BATCHES,
    name: str | None = None,
) -> list[Check]:
    """Load ``path`` with ``torch.jit.load`` and compare its logits with ``model``'s."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still what Triton runs
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return loaded(x).numpy()

    what = f"TorchScript {name or Path(path).name}"
    return _verify(run, _eager_copy(model), image_size, FP32_TOLERANCE, batches, what)


@contextmanager
def _staged(path: Path, what: str):
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on any failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, path)
    except Exception as error:
        staging.unlink(missing_ok=True)
        if isinstance(error, ExportError):
            raise
        raise ExportError(f"{what} failed: {error}") from error


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write ``model`` as ONNX: input ``input`` ``(batch, 3, S, S)`` FP32, outputs ``logits`` and
    ``probabilities`` ``(batch, classes)`` FP32, batch axis dynamic. ``fp16`` computes in half
    precision inside the graph (for GPUs). Verified with ONNX Runtime before it is moved into place."""
    path = Path(path)
    size = image_size or default_image_size(model)
    eager = _eager_copy(model)
    module = _Exportable(copy.deepcopy(eager), fp16=fp16).eval()
    log.info("exporting ONNX (opset %d, %s) to %s", opset, "fp16" if fp16 else "fp32", path)
    with _staged(path, f"ONNX export of {type(model).__name__}") as staging:
        with warnings.catch_warnings(), _quiet(EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")  # the exporter's internal deprecation chatter, not ours to fix
            program = torch.onnx.export(
                module,
                (_inputs(TRACE_BATCH, size, 0),),
                input_names=[triton_config.INPUT_NAME],
                output_names=list(triton_config.OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        program.save(str(staging))
        checks = verify_onnx(staging, eager, image_size=size, fp16=fp16, batches=verify_batches, name=path.name)
    return ExportResult("onnx", path, "fp16" if fp16 else "fp32", size, checks)


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write ``model`` traced and frozen as TorchScript (logits out); verified with ``torch.jit.load``."""
    path = Path(path)
    size = image_size or default_image_size(model)
    eager = _eager_copy(model)
    log.info("tracing TorchScript to %s", path)
    with _staged(path, f"TorchScript export of {type(model).__name__}") as staging:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still what Triton runs
            traced = torch.jit.trace(copy.deepcopy(eager), _inputs(TRACE_BATCH, size, 0), check_trace=False)
            torch.jit.save(torch.jit.freeze(traced), str(staging))
        checks = verify_torchscript(staging, eager, image_size=size, batches=verify_batches, name=path.name)
    return ExportResult("torchscript", path, "fp32", size, checks)


def export_triton(
    model: ResNet,
    repository: str | Path,
    *,
    name: str | None = None,
    image_size: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instance_count: int = 1,
    accelerator: str | None = None,
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Write ``<repository>/<name>/config.pbtxt``, ``1/model.onnx`` and ``labels.txt``.

    The folder is built beside its final place, the ONNX file verified and the config checked
    against Triton's schema and the graph (:func:`resnext_hub.triton.validate_model_dir`), then
    moved into place. ``labels`` default to the ImageNet names for 1000-class models.
    """
    repository = Path(repository)
    name = name or model.architecture or type(model).__name__.lower()
    size = image_size or default_image_size(model)
    num_classes = model.num_classes
    if labels is None:
        labels = list(model.classes.names)
    if labels is not None and len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {num_classes} classes")
    final = repository / name
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
    config = triton_config.build_config(
        name,
        image_size=size,
        num_classes=num_classes,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        queue_delay_us=queue_delay_us,
        instance_kind=instance_kind,
        instance_count=instance_count,
        accelerator=accelerator,
        fp16=fp16,
        labels=labels is not None,
    )
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=repository)) / name
    try:
        (staging / "1").mkdir(parents=True)
        result = export_onnx(
            model,
            staging / "1" / triton_config.MODEL_FILE,
            image_size=size,
            fp16=fp16,
            opset=opset,
            verify_batches=verify_batches,
        )
        if labels is not None:
            (staging / triton_config.LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
        (staging / "config.pbtxt").write_text(triton_config.config_text(config), encoding="utf-8")
        triton_config.validate_model_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    log.info("Triton model %s written and validated", final)
    return ExportResult("triton", final, result.dtype, size, result.checks)
