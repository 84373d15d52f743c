"""Fine-tune a model on your own classes, in one process or many (``torchrun``): :func:`finetune`.

The recipe:

- **Data**: ``DATA/train/<class>/`` and ``DATA/val/<class>/`` with the same class folders (sorted
  names = class indices). Files the hardened loader cannot read are found before training,
  reported and left out.
- **Model**: the architecture's published weights (or ``pretrained_from_file``, or random with
  ``pretrained=False``: Kaiming-normal convolutions, the last BatchNorm of each block zeroed, as
  timm's) with a fresh head for the classes (a fine-tuned file with the same class names keeps
  its head). ``freeze_backbone`` trains the head only; the backbone's BatchNorm statistics are
  frozen with it.
- **Validation input**: the weights' own preprocessing preset scaled to ``image_size`` (default:
  the preset's crop size): resize by the preset's resize/crop ratio, center crop, same
  interpolation, mean and std. That preset is saved with the weights. Large photos are decoded at
  reduced size (at least twice the resize target), as the engine decodes them.
- **Training input**: ``RandomResizedCrop(image_size, scale=(0.25, 1))`` with the preset's
  interpolation, random horizontal flip, the preset's normalization.
- **Optimization**: AdamW (weight decay 0.05 on weights, none on biases and BatchNorm), linear
  warmup over the first 10% of the steps, then cosine decay to 0, updated every step;
  cross-entropy with label smoothing 0.1 (the reported val loss is plain cross-entropy).
- **Multi-label** (``multi_label``; labels from CSV files, :mod:`resnext_hub.labels_csv`): binary
  cross-entropy on the logits (no label smoothing); validation gives the loss, mAP and macro F1 (%) and
  chooses each label's threshold, the one maximising its F1 on the validation images
  (:func:`~resnext_hub.metrics.f1_thresholds`), saved with the label names in the checkpoint; the best
  epoch is the one with the best mAP.
- **Speed**: mixed precision where the hardware has it (bf16 autocast on CPUs with native bf16;
  bf16 on CUDA GPUs that have it, else fp16 with a GradScaler), channels-last.
- **Many processes**: DistributedDataParallel (gloo on CPU, NCCL on CUDA); ``batch_size`` is the
  global batch (``batch_size / world_size`` per process); training batches from
  ``DistributedSampler`` (seed, ``set_epoch``); validation sharded without padding, so every
  image counts once; optional SyncBatchNorm (CUDA); only rank 0 writes files.
- **Reproducible and resumable**: an epoch depends only on the state at its start and on
  ``(seed, epoch)`` (the sampler's shuffle, and each image's augmentation seeded by
  ``(seed, epoch, index)``), and ``last.pth`` holds that state after every epoch: ``resume``
  continues a killed run to the same final weights and metrics as an uninterrupted one (same
  hardware and process count). :mod:`resnext_hub.training.state` lists the output files.

This module makes every check before training (options, data, output folder, a resumed run's state) and
starts the run; the training itself is :class:`~resnext_hub.training.trainer.Trainer`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..console import printable
from ..distributed import DistContext, distributed
from ..models.registry import architecture_of
from . import state
from .data import FolderData, read_folder, read_labelled
from .state import FIELDS, FinetuneSettings
from .trainer import Trainer


def finetune(
    data: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    workers: int = 4,
    device: str = "auto",
    progress: bool = False,
    ctx: DistContext | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Fine-tune on ``data`` (``train/<class>/``, ``val/<class>/``), writing checkpoints and metrics to ``out``.

    ``settings`` are the fields of :class:`FinetuneSettings` (``model``, ``epochs``, ``batch_size``,
    ``lr``, ``image_size``, ``pretrained``, ``pretrained_from_file``, ``freeze_backbone``, ``seed``,
    ``sync_bn``, ``precision``, ...). ``resume=True`` continues the run in ``out`` with its saved
    settings; a setting given that differs from the run's is refused. ``workers``: data-loading
    processes per rank; ``device``: auto, cpu or cuda. Under ``torchrun`` (or with ``ctx``) the
    processes train together. Returns the summary (the same on every rank). ``ValueError`` for bad
    options, data, output folder or saved state (``CheckpointError``), before any training, raised on
    every rank; ``state.OutputWriteError`` (an ``OSError``) when a file of the run could not be written
    (a full disk): the files of the epochs before are complete. ``out`` is locked while the run writes it.
    """
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise TypeError(f"finetune() got unknown settings {unknown}; expected some of {list(FIELDS)}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if ctx is None:
        with distributed(device) as ctx:
            return finetune(data, out, resume=resume, workers=workers, progress=progress, ctx=ctx, **settings)
    with ExitStack() as stack:
        folder, out, chosen, saved = _prepare(data, Path(out), resume, settings, ctx, stack)
        return Trainer(folder, out, chosen, ctx, workers=workers, progress=progress, saved=saved).run()


def _prepare(
    data: str | Path, out: Path, resume: bool, settings: Mapping[str, Any], ctx: DistContext, stack: ExitStack
) -> tuple[FolderData, Path, FinetuneSettings, dict[str, Any] | None]:
    """Every check before the model is built, in the same order on every rank; rank 0 also takes the
    output folder (``stack`` releases it). A refusal is raised on every rank at the same point."""
    error: Exception | None = None
    try:
        given = {name: value for name, value in settings.items() if value is not None}
        if "model" in given:
            given["model"] = architecture_of(given["model"])
        for name in ("labels", "val_labels"):  # kept absolute: a resumed run may start in another folder
            if name in given:
                given[name] = str(Path(given[name]).expanduser().absolute())
        chosen = None if resume else FinetuneSettings(**given)
        folder = None if resume else _read_data(data, chosen.as_dict())
        if chosen is not None and chosen.pretrained_from_file is not None:
            if not Path(chosen.pretrained_from_file).expanduser().is_file():
                raise ValueError(
                    f"--pretrained-from-file {chosen.pretrained_from_file} does not exist (or is not a file)"
                )
        if ctx.is_main:  # only rank 0 writes: its output folder, checked and then held for the whole run
            state.check_output_folder(out, Path(data))
            stack.enter_context(state.output_lock(out))  # first: a run in progress is named as such
            state.refuse_other_run(out, resume)
    except ValueError as failed:
        error = failed
    except OSError as failed:  # a path on the way that cannot be looked at (permissions)
        error = ValueError(f"{printable(failed.filename or data)} could not be read: {failed.strerror or failed}")
    ctx.raise_together(error)
    saved = None
    if resume:  # every rank reads the run it continues
        try:
            saved = state.load_last(out)
            stored = saved.get("settings")
            folder = _read_data(data, stored if isinstance(stored, Mapping) else {})
            chosen = state.check_resume(saved, out / state.LAST, folder.classes)
            state.check_same_run(chosen.as_dict(), given, out / state.LAST)
        except ValueError as failed:
            error = failed
        ctx.raise_together(error)
    try:
        if chosen.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {chosen.batch_size} (global) is not divisible by the {ctx.world_size} processes"
            )
        if chosen.sync_bn and ctx.distributed and ctx.device.type != "cuda":
            raise ValueError("sync_bn (--sync-bn) needs CUDA: torch's SyncBatchNorm does not run on CPU")
        if chosen.precision == "fp16" and ctx.device.type != "cuda":
            raise ValueError("precision fp16 needs CUDA (on CPU use bf16 or fp32)")
    except ValueError as failed:
        error = failed
    ctx.raise_together(error)
    return folder, out, chosen, saved


def _read_data(data: str | Path, settings: Mapping[str, Any]) -> FolderData:
    """The run's images: class folders, or for a multi-label run (``settings``) its two labels files (by default
    ``train.csv`` and ``val.csv`` in ``data``, see :mod:`resnext_hub.labels_csv`)."""
    if settings.get("multi_label") is not True:
        return read_folder(data)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data folder {printable(root)} does not exist (or is not a folder)")
    return read_labelled(root, settings.get("labels") or "train.csv", settings.get("val_labels") or "val.csv")
