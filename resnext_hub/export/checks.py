"""What every export shares: the tolerance rule, the verification runs, the staging of files.

Tolerance: ``max |exported - eager| <= tol * max(1, max |eager|)`` on the logits (the scale term
keeps the bound meaningful for large logits), with ``tol`` :data:`FP32_TOLERANCE` for fp32,
:data:`FP16_TOLERANCE` for fp16 and :data:`BF16_TOLERANCE` for bf16, and the top-1 class must agree.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..console import printable
from ..models.meta import Described
from ..outputs import write_problem
from ..processing import atomic

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
# bf16 keeps 8 significand bits to fp16's 11, so its rounding error is about 8x larger (figures: docs/triton.md).
BF16_TOLERANCE = 5e-2
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, "bf16": BF16_TOLERANCE}
TRACE_BATCH = 2
VERIFY_BATCHES = (1, 3)


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
    """What was written, how it was verified, and how long the steps took (``timings``, seconds)."""

    format: str
    path: Path
    dtype: str
    image_size: int
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        runs = ", ".join(
            f"batch {c.batch_size}: max|diff| {c.max_abs_diff:.2e} (logits up to {c.logit_scale:.3g})"
            for c in self.checks
        )
        times = "".join(
            f"; {name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.timings.items()
        )
        shape = f"{self.image_size}x{self.image_size}"
        return f"{self.format} ({self.dtype}, {shape}) -> {self.path}; verified {runs}{times}"


@contextmanager
def quiet(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers to ``level`` for the block: the exporters log every graph pass at INFO."""
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def default_image_size(model: nn.Module) -> int:
    """The crop size the model's weights expect (224 for a module that is not one of ours)."""
    return model.preprocessing.crop_size if isinstance(model, Described) else 224


def eager_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval copy: the caller's model keeps its device, dtype and memory format."""
    return copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()


def example_input(batch_size: int, image_size: int, seed: int) -> torch.Tensor:
    """Seeded random images ``(batch, 3, S, S)``: what exports are traced and verified with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


def verification_inputs(image_size: int, batches: Sequence[int]) -> list[torch.Tensor]:
    """The inputs every export is checked on, one per batch size (seeds 1, 2, ...; tracing uses seed 0)."""
    return [example_input(batch, image_size, seed) for seed, batch in enumerate(batches, 1)]


def compare(
    run_all: Callable[[list[torch.Tensor]], Sequence[np.ndarray]],
    eager: nn.Module,
    image_size: int,
    tolerance: float,
    batches: Sequence[int],
    what: str,
) -> list[Check]:
    """Run the export on :func:`verification_inputs` (``run_all`` gets them all at once) and hold it to the rule."""
    inputs = verification_inputs(image_size, batches)
    outputs = run_all(inputs)
    checks = []
    for x, output in zip(inputs, outputs, strict=True):
        batch = x.shape[0]
        with torch.inference_mode():
            expected = eager(x).numpy().astype(np.float64)
        exported = np.asarray(output, dtype=np.float64)
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


def verify(
    run: Callable[[torch.Tensor], np.ndarray],
    eager: nn.Module,
    image_size: int,
    tolerance: float,
    batches: Sequence[int],
    what: str,
) -> list[Check]:
    """:func:`compare` for a runtime in this process: ``run`` takes one batch at a time."""
    return compare(lambda inputs: [run(x) for x in inputs], eager, image_size, tolerance, batches, what)


@contextmanager
def staged(path: Path, what: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Where to write ``path`` (:func:`resnext_hub.processing.atomic.staged`: a private folder beside it, the
    file under its own name); on success it becomes ``path``, on any failure or interruption nothing is
    left and an existing ``path`` is unchanged. An existing ``path`` is refused unless ``overwrite``
    (before any work, and again when the file is moved into place). An error that is not an
    :class:`ExportError` becomes one (a file-system fault says which and what to do);
    ``KeyboardInterrupt`` and ``SystemExit`` pass through."""
    if not overwrite and os.path.lexists(path):
        raise ExportError(f"{printable(path)} already exists: pass overwrite=True (--overwrite) to replace it")
    kept = " (the existing file is unchanged)" if os.path.lexists(path) else ""
    try:
        with atomic.staged(path, replace=overwrite) as staging:
            yield staging
    except ExportError:
        raise
    except FileExistsError as error:
        if error.filename != str(path):
            raise ExportError(f"{what} failed: {error}") from error
        raise ExportError(f"{printable(path)} appeared while it was exported; it was left as it is") from error
    except Exception as error:
        problem = write_problem(error, path)
        if problem is None:
            raise ExportError(f"{what} failed: {error}") from error
        raise ExportError(f"{what}: {problem}; nothing was written{kept}") from error
