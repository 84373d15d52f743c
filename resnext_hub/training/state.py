"""A fine-tuning run's settings, and what it leaves in its output folder (written by rank 0 only).

- ``best.pth``: the weights of the epoch with the best validation top-1, with the class names, the
  architecture and the preprocessing (``models.finetuned.finetuned_checkpoint``): what
  ``build_model(NAME, pretrained_from_file=...)`` needs to rebuild the model.
- ``last.pth``: the same for the last finished epoch, plus everything ``--resume`` needs: optimizer,
  scheduler and grad-scaler state, the epoch count, RNG states, the settings and the metrics so far.
- ``metrics.jsonl``: one JSON object per epoch; ``curves.png``: loss and accuracy against epochs.
- ``.lock``: held (``flock``) by the run writing the folder, so a second run into it is refused.

Checkpoints are written to a temporary file then renamed over the old one: a run killed at any
moment leaves the previous complete file. A temporary file left by a process killed outright
(SIGKILL) is removed by the next run in the folder, which alone holds the lock.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..console import printable
from ..models import CheckpointError
from ..models.checkpoint import load_torch_file
from ..models.registry import architecture_of
from ..outputs import check_output
from ..processing.atomic import open_atomic, staged, write_atomic

LAST, BEST, METRICS, CURVES = "last.pth", "best.pth", "metrics.jsonl", "curves.png"
OUTPUTS = (BEST, LAST, METRICS, CURVES)  # any of them in a folder: it holds a run
LOCK = ".lock"
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
    multi_label: bool = False  # labels from CSV files (resnext_hub.labels_csv), a sigmoid head, BCE, mAP
    labels: str | None = None  # multi-label training file; None: DATA/train.csv
    val_labels: str | None = None  # multi-label validation file; None: DATA/val.csv

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
        if not self.multi_label and (self.labels is not None or self.val_labels is not None):
            raise ValueError("labels files (--labels, --val-labels) are for multi-label runs: add --multi-label")
        if self.pretrained_from_file is not None and not self.pretrained:
            raise ValueError("pretrained_from_file and pretrained=False (--no-pretrained) contradict each other")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(FinetuneSettings))
# What makes an epoch the best (best.pth): validation top-1, or mAP for a multi-label run (by multi_label).
BEST_SCORE = {False: "val_top1", True: "val_map"}


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, flushed to disk before it replaces the old file."""
    with open_atomic(path, "wb", fsync=True) as handle:
        torch.save(obj, handle)


# -- the output folder: checked before any work, locked while written ----------------------------------


class OutputWriteError(OSError):
    """A file of the run could not be written (a full disk, a lost mount): the run stops there."""


def check_output_folder(out: Path, data: Path) -> None:
    """``ValueError`` unless the run's files can be written in ``out``: a folder (or one that can be
    created), writable, its files replaceable, and not inside the data's train/ or val/ folders."""
    shown = printable(out)
    try:
        above = out
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            where = "" if above == out else f": {printable(above)} is a file"
            raise ValueError(
                f"--output {shown} is not a folder{where}; give a folder for the run's files ({', '.join(OUTPUTS)})"
            )
        resolved = out.resolve()
        for split in ("train", "val"):
            if resolved.is_relative_to((data / split).resolve()):
                raise ValueError(
                    f"--output {shown} is inside the data folder's {split}/: its files would become images or "
                    "classes of the next run; give a folder outside it"
                )
        for name in OUTPUTS:
            check_output(out / name, "--output", replaced=name != METRICS)
    except OSError as error:  # a folder on the way that cannot be entered
        raise ValueError(
            f"--output {shown} cannot be used ({error.strerror or error}): give a folder this user can write"
        ) from error


def refuse_other_run(out: Path, resume: bool) -> None:
    """``ValueError`` if ``out`` holds (part of) a run and this is not ``--resume``, or nothing to resume."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if resume and LAST not in found:
        held = f" (it holds {', '.join(found)} but no {LAST})" if found else ""
        raise ValueError(f"--resume: {printable(out / LAST)} does not exist; there is no run to continue{held}")
    if not resume and found:
        how = "pass --resume to continue it, or" if LAST in found else "its files would be overwritten:"
        raise ValueError(f"{printable(out)} already holds a run ({', '.join(found)}): {how} choose another folder")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (created with the folder) for the block: ``ValueError`` naming the process that
    holds it. The lock ends with the process whatever happens (the kernel releases ``flock`` locks);
    the file is removed on the way out (with the folder, if this created it and it stayed empty), and
    staging files left by killed runs are removed on the way in."""
    path = out / LOCK
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"{printable(out)} is being written by another finetune run (pid {holder}): wait for it to "
                    "finish, or choose another folder"
                ) from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # else the holder before removed the file as this one opened it: take the new file
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_staging(out)
    except OSError as error:
        raise ValueError(
            f"--output {printable(out)} could not be prepared ({error.strerror or error}"
            f"{disk_full_hint(error)}): give a folder this user can write"
        ) from error
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()  # before the lock ends: no second process holds a lock on an unlinked file
        os.close(fd)
        if created:
            with suppress(OSError):
                out.rmdir()  # a run refused or stopped before its first file leaves no empty folder


def remove_staging(out: Path) -> list[Path]:
    """Remove (and return) the temporary files and staging folders of the run's outputs (``.<name>.*``,
    see :mod:`resnext_hub.processing.atomic`) left in ``out`` by a killed run."""
    staged = [p for name in OUTPUTS for p in out.glob(f".{name}.*")]
    for path in staged:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return staged


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full_hint(error: BaseException) -> str:
    """``"; the disk is full ..."`` when ``error`` (or what it was raised from) says so, else ``""``."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return "; the disk is full (or a quota or file size limit is reached)"
    return ""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def interruption(error: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM (``KeyboardInterrupt``, ``SystemExit``) that ``error`` stands for, if any.

    ``torch.save`` turns an exception raised while it writes into a ``RuntimeError`` of its own.
    """
    return next((e for e in _chain(error) if isinstance(e, (KeyboardInterrupt, SystemExit))), None)


def write_failure(path: Path, error: BaseException, out: Path) -> OutputWriteError:
    """The one-line error for a file of the run that could not be written, and what is kept."""
    reason = next((f"{e.strerror or e}" for e in _chain(error) if isinstance(e, OSError)), None)
    hint = disk_full_hint(error)
    if reason is None:  # torch's writer reports only a position ("unexpected pos"): the storage failed
        reason, hint = f"{type(error).__name__}: {error}", "; the disk is probably full"
    if (out / LAST).exists():
        kept = f"the files of the epochs before are kept: make room, then continue with --resume -o {printable(out)}"
    else:
        kept = f"no epoch was saved: make room, then start again in a new folder (or empty {printable(out)})"
    return OutputWriteError(f"writing {printable(path)} failed ({reason}{hint}); {kept}")


# -- resume ------------------------------------------------------------------------------------------


def load_last(out: Path) -> dict[str, Any]:
    """``out/last.pth`` as saved (``weights_only=True``)."""
    path = out / LAST
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist; there is no run to continue in {out}")
    try:
        state = load_torch_file(path)
    except CheckpointError as error:
        raise CheckpointError(f"--resume: {error}") from error
    if not isinstance(state, Mapping) or not {"settings", "epoch", "optimizer", "history"} <= set(state):
        raise CheckpointError(f"--resume: {path} is not the last.pth of a fine-tuning run")
    return dict(state)


def unusable(path: Path, field: str, why: str) -> CheckpointError:
    """The error for a ``last.pth`` whose ``field`` this code or model cannot continue from."""
    return CheckpointError(
        f"--resume: {printable(path)}: its {field} {why}, so the run cannot be continued from it; start afresh "
        f"in another folder (-o NEW; {printable(path.parent)} is left as it is)"
    )


def check_resume(saved: Mapping[str, Any], path: Path, classes: Sequence[str]) -> FinetuneSettings:
    """The settings of the run in ``saved`` (a ``last.pth``), once every field of it is consistent with
    itself and with the data's ``classes``; ``CheckpointError`` naming the first field that is not."""
    settings = saved["settings"]
    if not isinstance(settings, Mapping):
        raise unusable(path, "settings", f"are a {type(settings).__name__}, not a mapping of options")
    try:
        chosen = FinetuneSettings(**settings)
    except (TypeError, ValueError) as error:
        raise unusable(path, "settings", f"are not this version's ({error})") from error
    if saved.get("architecture") != chosen.model:
        raise unusable(path, "architecture", f"is {saved.get('architecture')!r}, the settings say {chosen.model!r}")
    saved_classes = saved.get("classes")
    if not isinstance(saved_classes, list) or not all(isinstance(name, str) for name in saved_classes):
        raise unusable(path, "classes", "are not a list of names")
    if list(saved_classes) != list(classes):
        raise CheckpointError(
            f"--resume: {printable(path)} was trained on the classes [{_names(saved_classes)}], the data folder "
            f"has [{_names(classes)}]: resume with the run's own data folder, or start afresh in another folder"
        )
    epoch, history = saved["epoch"], saved["history"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= chosen.epochs:
        raise unusable(path, "epoch", f"is {epoch!r}, outside the run's 1..{chosen.epochs} epochs")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, Mapping) for r in history):
        raise unusable(path, "history", f"does not hold one record per epoch ({epoch})")
    if [record.get("epoch") for record in history] != list(range(1, epoch + 1)):
        raise unusable(path, "history", f"does not number its records 1..{epoch}")
    best = saved.get("best")
    score = BEST_SCORE[chosen.multi_label]
    if not isinstance(best, Mapping) or not isinstance(best.get(score), (int, float)):
        raise unusable(path, "best", f"is not a record of the best epoch ({score}, epoch)")
    if not isinstance(best.get("epoch"), int) or not 0 <= best["epoch"] <= epoch:
        raise unusable(path, "best", f"names epoch {best.get('epoch')!r}, not one of the {epoch} run")
    rng = saved.get("rng")
    if not isinstance(rng, Mapping) or not isinstance(rng.get("torch"), torch.Tensor):
        raise unusable(path, "rng", "is not the saved random number generator state")
    for field in ("optimizer", "scheduler"):
        if not isinstance(saved.get(field), Mapping):
            raise unusable(path, field, "is not a saved state (a mapping)")
    weights = saved.get("state_dict")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise unusable(path, "state_dict", "is not a state dict of weights (tensors)")
    return chosen


def _names(names: Sequence[str]) -> str:
    return ", ".join(printable(repr(name)) for name in list(names)[:8]) + (" ..." if len(names) > 8 else "")


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
    multi_label = bool(history) and "val_map" in history[0]
    train_label = "train" if multi_label else "train (label smoothing 0.1)"
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", label=train_label)
    loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    if multi_label:
        loss.set(ylabel="binary cross-entropy")
        accuracy.plot(epochs, [r["val_map"] for r in history], "o-", label="val mAP")
        accuracy.plot(epochs, [r["val_f1"] for r in history], "o-", label="val macro F1 (chosen thresholds)")
        accuracy.set(xlabel="epoch", ylabel="%", title="multi-label", ylim=(0, 100.5))
    else:
        accuracy.plot(epochs, [r["train_top1"] for r in history], "o--", label="train top-1 (augmented)")
        accuracy.plot(epochs, [r["val_top1"] for r in history], "o-", label="val top-1")
        accuracy.plot(epochs, [r["val_top5"] for r in history], "o-", label="val top-5")
        accuracy.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100.5))
    for axes in (loss, accuracy):
        axes.grid(alpha=0.3)
        axes.legend()
    with staged(path) as staging:  # named as the target: savefig takes the format from the suffix
        figure.savefig(staging, dpi=100)
