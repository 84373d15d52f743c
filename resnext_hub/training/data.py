"""Fine-tuning data: an ImageFolder-layout folder checked at the boundary, its transforms, per-epoch batches.

``DATA/train/<class>/...`` and ``DATA/val/<class>/...``, read by the one class-folder reader
(:func:`resnext_hub.data.read_class_folders`): the class names are the folder names and their
sorted order is the class index. Every image goes through the one hardened loader
(``processing.load_image``, via :class:`~resnext_hub.decoding.ImageListDataset`); files it cannot read
are found once, before training, and left out. Multi-label runs read two labels files instead
(:func:`read_labelled`, the format in :mod:`resnext_hub.labels_csv`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from ..console import printable
from ..data import Skipped, quoted, read_class_folders
from ..decoding import ImageListDataset, Sample, make_loader
from ..distributed import DistContext, shard_batches
from ..labels_csv import LabelsFileError, read_labels_csv
from ..processing import ImageClassification
from ..processing.labels import name_problem

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# RandomResizedCrop's area range. torchvision's ImageNet default starts at 0.08; small fine-tuning sets
# have one object per image that such crops often cut away entirely.
CROP_SCALE = (0.25, 1.0)
_PROBE_BATCH = 32


@dataclass(frozen=True)
class Split:
    """The image files of one split and their class indices.

    Multi-label (``rows``: the 0/1 targets of the split's images, one row per image, one column per label):
    ``targets`` are the images' row numbers in ``rows``.
    """

    items: list[str]
    targets: list[int]
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: Sequence[int]) -> Split:
        return Split([self.items[i] for i in keep], [self.targets[i] for i in keep], self.rows)


@dataclass(frozen=True)
class FolderData:
    """A fine-tuning folder: its class names (sorted), its two splits, and the folders that could not be read."""

    root: Path
    classes: tuple[str, ...]
    train: Split
    val: Split
    skipped: tuple[Skipped, ...] = ()

    @property
    def multi_label(self) -> bool:
        """Whether the images have any number of labels each (read from labels files), not one class folder."""
        return self.train.rows is not None


def read_folder(root: str | Path) -> FolderData:
    """The classes and images of ``root`` (each split read by :func:`~resnext_hub.data.read_class_folders`);
    ``ValueError`` saying what is wrong with the layout, the folder names or the permissions.

    A folder below a class folder that cannot be read is left out and listed in ``skipped``; a class
    with no training image (its folder unreadable, say) is an error.
    """
    root = Path(root)
    try:
        return _read_folder(root)
    except OSError as error:  # a folder on the way that cannot be entered (permissions, a lost mount)
        where = printable(error.filename or root)
        raise ValueError(
            f"data folder {printable(root)} could not be read ({where}: {error.strerror or error}): "
            "give a folder this user can read"
        ) from error


def _read_folder(root: Path) -> FolderData:
    if not root.is_dir():
        raise ValueError(f"data folder {printable(root)} does not exist (or is not a folder)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ValueError(f"data folder {printable(root)} could not be read (permission denied): give a readable folder")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise ValueError(
                f"{printable(root / split)} is missing: the data folder needs train/<class>/ and val/<class>/ "
                "sub-folders"
            )
    skipped: list[Skipped] = []
    train, val = (read_class_folders(root / split, skipped) for split in SPLITS)
    for split, found in zip(SPLITS, (train, val)):
        for name in found.names:
            problem = name_problem(name)
            if problem:
                raise ValueError(
                    f"class folder {printable(root / split / name)}: its name {problem} (it becomes the label in "
                    "best.pth, label files and server responses); rename the folder"
                )
    if train.names != val.names:
        only_train = [c for c in train.names if c not in val.names]
        only_val = [c for c in val.names if c not in train.names]
        raise ValueError(
            f"{printable(root)}: train/ and val/ must have the same class folders; only in train/: "
            f"[{quoted(only_train)}], only in val/: [{quoted(only_val)}]"
        )
    if len(train.names) < 2:
        raise ValueError(f"{printable(root)}/train needs at least 2 class folders, found {len(train.names)}")
    empty = [name for name, files in zip(train.names, train.files) if not files]
    if empty:
        folder = root / "train" / empty[0]
        unreadable = [entry for entry in skipped if Path(entry.path) == folder]
        if unreadable:
            raise ValueError(
                f"class folder {printable(folder)} could not be read ({unreadable[0].reason}): every class needs "
                "training images; make it readable"
            )
        raise ValueError(f"{printable(folder)} holds no images (.jpg, .png, .webp, ...)")
    indices = range(len(train.names))  # the sorted folder names are the class indices
    splits = [found.samples(indices) for found in (train, val)]
    return FolderData(
        root, train.names, *(Split([p for p, _ in s], [t for _, t in s]) for s in splits), skipped=tuple(skipped)
    )


def _no_tensor(image: object) -> torch.Tensor:
    return torch.empty(0)  # decoding the image was the check


def drop_unreadable(split: Split, ctx: DistContext, workers: int) -> tuple[Split, list[tuple[str, str]]]:
    """``split`` without the files the loader cannot read, and ``(path, reason)`` of those.

    Each rank decodes its shard once; every rank gets the same answer.
    """
    batches = shard_batches(len(split), _PROBE_BATCH, ctx.rank, ctx.world_size)
    failed: list[tuple[int, str]] = []
    for batch in make_loader(ImageListDataset(split.items, _no_tensor), batches, workers, torch.device("cpu")):
        failed += batch.failed
    failed = sorted(f for part in ctx.all_gather_object(failed) for f in part)
    bad = {i for i, _ in failed}
    return split.subset([i for i in range(len(split)) if i not in bad]), [(split.items[i], r) for i, r in failed]


def scaled_preset(preset: ImageClassification, image_size: int) -> ImageClassification:
    """``preset`` at another crop size: the resize keeps the preset's resize/crop ratio."""
    return replace(
        preset,
        resize_size=max(image_size, round(image_size * preset.resize_size / preset.crop_size)),
        crop_size=image_size,
    )


def train_transform(preset: ImageClassification) -> Callable:
    """RandomResizedCrop at the preset's crop size and interpolation, horizontal flip, the preset's normalization."""
    from torchvision import transforms as T  # seconds to import: only when training

    return T.Compose(
        [
            T.RandomResizedCrop(
                preset.crop_size, scale=CROP_SCALE, interpolation=T.InterpolationMode(preset.interpolation)
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(preset.mean, preset.std),
        ]
    )


class AugmentedImages(ImageListDataset):
    """Training images whose random augmentation is seeded by ``(seed, epoch, index)``.

    So an epoch's inputs depend on nothing else: not on the loader's worker count, the number of
    processes, or whether the run was resumed. Set ``epoch`` before iterating.
    """

    def __init__(self, split: Split, transform: Callable, seed: int) -> None:
        super().__init__(split.items, transform, split.targets)
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, index: int) -> Sample:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % 2**63)
            return super().__getitem__(index)


def epoch_batches(count: int, per_rank: int, ctx: DistContext, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of an epoch: DistributedSampler's shuffle of (seed, epoch); the last partial one dropped."""
    sampler = DistributedSampler(range(count), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + per_rank] for i in range(0, len(order) - per_rank + 1, per_rank)]


def steps_per_epoch(count: int, per_rank: int, world_size: int) -> int:
    """Training steps of one epoch (as :func:`epoch_batches` counts them, on every rank)."""
    return -(-count // world_size) // per_rank


def read_labelled(root: str | Path, train_csv: str | Path, val_csv: str | Path) -> FolderData:
    """The multi-label data of two labels files (relative paths: below ``root``), as the fine-tuning folder
    record: the training file's sorted label names as classes, each split's 0/1 targets in ``rows``."""
    root = Path(root)
    train, val = (read_labels_csv(_below(root, name)) for name in (train_csv, val_csv))
    names = train.names()
    if not names:
        raise LabelsFileError(f"labels file {printable(train.source)} names no label: every row's labels are empty")
    splits = [Split(part.paths, list(range(len(part))), part.multi_hot(names)) for part in (train, val)]
    return FolderData(root, names, *splits)


def _below(root: Path, name: str | Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path
