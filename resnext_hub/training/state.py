"""A fine-tuning run's settings, and what it leaves in its output folder (written by rank 0 only).

- ``best.pth``: the weights of the epoch with the best validation top-1, with the class names, the
  architecture and the preprocessing (``models.checkpoint.finetuned_checkpoint``): what
  ``build_model(NAME, pretrained_from_file=...)`` needs to rebuild the model.
- ``last.pth``: the same for the last finished epoch, plus everything ``--resume`` needs: optimizer,
  scheduler and grad-scaler state, the epoch count, RNG states, the settings and the metrics so far.
- ``metrics.jsonl``: one JSON object per epoch; ``curves.png``: loss and accuracy against epochs.

Checkpoints are written to a temporary file then renamed over the old one: a run killed at any
moment leaves the previous complete file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models import CheckpointError
from ..models.registry import architecture_of
from ..processing.atomic import open_atomic, staged, write_atomic

LAST, BEST, METRICS, CURVES = "last.pth", "best.pth", "metrics.jsonl", "curves.png"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIN_IMAGE_SIZE = 32  # the network's total stride


@dataclass(frozen=True)
class FinetuneSettings:
    """What decides a run's result; saved in ``last.pth`` and checked on resume."""

    model: str = "se_resnext101_32x4d"
    epochs: int = 10
    batch_size: int = 32  # global: over all processes
    lr: float = 5e-4  # peak, after warmup
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the steps
    image_size: int | None = None  # None: the weights' preset's crop size
    pretrained: bool = True
    pretrained_from_file: str | None = None
    freeze_backbone: bool = False
    seed: int = 0
    sync_bn: bool = False
    precision: str = "auto"  # auto, fp32, bf16, fp16

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", architecture_of(self.model))  # ValueError naming the choices
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        size = self.image_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE):
            raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}")
        for name, low, high in (("lr", 0, math.inf), ("weight_decay", 0, math.inf), ("warmup", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value < high:
                raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.pretrained_from_file is not None and not self.pretrained:
            raise ValueError("pretrained_from_file and pretrained=False (--no-pretrained) contradict each other")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(FinetuneSettings))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, flushed to disk before it replaces the old file."""
    with open_atomic(path, "wb", fsync=True) as handle:
        torch.save(obj, handle)


def load_last(out: Path) -> dict[str, Any]:
    """``out/last.pth`` as saved (``weights_only=True``)."""
    path = out / LAST
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist; there is no run to continue in {out}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"--resume: {path} could not be read: {error}") from error
    if not isinstance(state, Mapping) or not {"settings", "epoch", "optimizer", "history"} <= set(state):
        raise CheckpointError(f"--resume: {path} is not the last.pth of a fine-tuning run")
    return dict(state)


def check_same_run(saved: Mapping[str, Any], given: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume with settings other than the run's own (``given``: what the caller set explicitly)."""
    differ = [
        f"{name}={value!r} (the run has {saved.get(name)!r})"
        for name, value in given.items()
        if saved.get(name) != value
    ]
    if differ:
        raise ValueError(
            f"--resume: {where} was trained with other settings: {'; '.join(differ)}. "
            "Resume with the run's own settings (leave the options out), or start a new run in another folder"
        )


def rng_states() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device), as tensors that load with ``weights_only``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_metrics(out: Path, history: Sequence[Mapping[str, Any]], *, append: bool) -> None:
    """Append the last epoch's line to ``metrics.jsonl``, or rewrite it from ``history`` (after a resume)."""
    text = "".join(json.dumps(dict(record)) + "\n" for record in (history[-1:] if append else history))
    if not append:  # atomically: a rewrite cut short must not lose the earlier epochs' lines
        write_atomic(out / METRICS, text)
        return
    with open(out / METRICS, "a", encoding="utf-8") as handle:
        handle.write(text)


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss (train, val) and accuracy (val top-1, top-5) against epochs, as a PNG."""
    # The Figure API with the Agg canvas: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss, accuracy = figure.subplots(1, 2)
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (label smoothing 0.1)")
    loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy.plot(epochs, [r["train_top1"] for r in history], "o--", label="train top-1 (augmented)")
    accuracy.plot(epochs, [r["val_top1"] for r in history], "o-", label="val top-1")
    accuracy.plot(epochs, [r["val_top5"] for r in history], "o-", label="val top-5")
    accuracy.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100.5))
    for axes in (loss, accuracy):
        axes.grid(alpha=0.3)
        axes.legend()
    with staged(path) as staging:  # named as the target: savefig takes the format from the suffix
        figure.savefig(staging, dpi=100)
