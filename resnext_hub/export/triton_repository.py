"""A Triton model repository: the ONNX classifier with its config and labels, validated as Triton would."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .. import triton as triton_config
from ..models import ResNet
from .checks import VERIFY_BATCHES, ExportError, ExportResult, default_image_size
from .onnx_file import DEFAULT_OPSET, export_onnx

log = logging.getLogger(__name__)


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
