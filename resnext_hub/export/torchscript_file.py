"""TorchScript export: traced and frozen, verified with ``torch.jit.load`` (for old deployments)."""

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
    FP32_TOLERANCE,
    TRACE_BATCH,
    VERIFY_BATCHES,
    Check,
    ExportResult,
    default_image_size,
    eager_copy,
    example_input,
    staged,
    verify,
)
from .labels import TORCHSCRIPT_FILE, labels_json

log = logging.getLogger(__name__)


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
    return verify(run, eager_copy(model), image_size, FP32_TOLERANCE, batches, what)


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` traced and frozen as TorchScript (logits out; class names and a multi-label head's thresholds
    in the extra file ``labels.json``, see :mod:`.labels`); verified with ``torch.jit.load``.
    An existing file is replaced only with ``overwrite``."""
    path = Path(path)
    size = image_size or default_image_size(model)
    eager = eager_copy(model)
    log.info("tracing TorchScript to %s", path)
    with staged(path, f"TorchScript export of {type(model).__name__}", overwrite=overwrite) as staging:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still what Triton runs
            traced = torch.jit.trace(copy.deepcopy(eager), example_input(TRACE_BATCH, size, 0), check_trace=False)
            # Through a Python file: torch's own file writer aborts the process when a write fails (a full
            # disk); this way the write raises OSError. The archive's folder is then torch's "archive".
            with open(staging, "wb") as handle:
                labels = labels_json(eager)  # class names and a multi-label head's thresholds, beside the graph
                extra = {} if labels is None else {TORCHSCRIPT_FILE: labels}
                torch.jit.save(torch.jit.freeze(traced), handle, _extra_files=extra)
        checks = verify_torchscript(staging, eager, image_size=size, batches=verify_batches, name=path.name)
    return ExportResult("torchscript", path, "fp32", size, checks)
