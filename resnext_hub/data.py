"""Inputs: files, folders, list files and ImageNet-layout folders, and the dataset that decodes them.

Every image goes through the one hardened loader (``processing.load_image``) and the model's
preset; a file that is not a usable image gives its reason, never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .processing import InvalidImageError, imagenet_wnids, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_LISTED = 5


def _images_under(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """URLs and files as given; folders become their image files (recursively, sorted)."""
    expanded = []
    for item in inputs:
        path = Path(item)
        expanded += [str(p) for p in _images_under(path)] if path.is_dir() else [item]
    return expanded


def read_list_file(path: str | Path) -> list[str]:
    """The image paths/URLs of a list file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"list file {path} could not be read: {error.strerror or error}") from error
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def collect_inputs(inputs: Sequence[str] = (), list_files: Sequence[str] = ()) -> list[str]:
    """Files, folders (recursive, sorted), URLs, then the entries of list files; each once, first place kept."""
    items = expand_inputs(list(inputs))
    for list_file in list_files:
        items += read_list_file(list_file)
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        log.info("%d repeated input(s) will be classified once", len(items) - len(unique))
    return unique


def find_samples(root: str | Path, wnids: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``root/<wnid>/``, sorted by path.

    Class indices come from the ImageNet WordNet ids (``n01440764`` = 0), not from the sort
    order of the folders present, so a subset of the classes still scores against the right
    outputs. A folder that is not a WordNet id is refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist (or is not a folder)")
    index_of = {wnid: i for i, wnid in enumerate(wnids if wnids is not None else imagenet_wnids())}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index_of]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:_LISTED]) + (" ..." if len(unknown) > _LISTED else "")
        raise ValueError(
            f"{root} has {len(unknown)} folder(s) that are not ImageNet classes: {shown}. Expected one folder "
            "per ImageNet WordNet id (e.g. n01440764/), as ImageNet's validation set is laid out; "
            "see docs/distributed.md to sort the flat validation set into such folders"
        )
    samples = [(str(path), index_of[folder.name]) for folder in folders for path in _images_under(folder)]
    if not samples:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}/<wnid>/")
    return samples


class Sample(NamedTuple):
    index: int
    image: torch.Tensor | None  # None when the input is not a usable image
    target: int
    error: str | None


class Batch(NamedTuple):
    indices: list[int]  # of the images in ``images``
    images: torch.Tensor | None
    targets: torch.Tensor | None
    failed: list[tuple[int, str]]  # (index, reason) of the unusable inputs


class ImageListDataset(Dataset):
    """Images (paths, URLs or encoded bytes) by index, decoded by the hardened loader and ``transform``."""

    def __init__(self, items: Sequence[str | bytes], transform: Callable, targets: Sequence[int] | None = None) -> None:
        self.items = list(items)
        self.targets = list(targets) if targets is not None else [-1] * len(self.items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        try:
            image = self.transform(load_image(self.items[index]))
        except InvalidImageError as error:
            return Sample(index, None, self.targets[index], error.reason)
        return Sample(index, image, self.targets[index], None)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the usable images; keep the reasons of the others."""
    good = [s for s in samples if s.image is not None]
    failed = [(s.index, s.error or "unreadable") for s in samples if s.image is None]
    if not good:
        return Batch([], None, None, failed)
    images = torch.stack([s.image for s in good])
    targets = torch.tensor([s.target for s in good], dtype=torch.long)
    return Batch([s.index for s in good], images, targets, failed)


def make_loader(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int, device: torch.device) -> DataLoader:
    """A loader over exactly these batches of indices (no sampler padding), decoding in ``workers`` processes."""
    return DataLoader(
        dataset,
        batch_sampler=[list(batch) for batch in batches],
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
