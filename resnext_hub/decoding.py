"""The dataset that decodes inputs (paths, URLs, encoded bytes) for the model, and its loader.

Every image goes through the one hardened loader (``processing.load_image``) and the model's
preset; a file that is not a usable image gives its reason, never an exception. That boundary
holds for any exception (``Exception``, not ``KeyboardInterrupt``/``SystemExit``): an input that
makes decoding or preprocessing raise something unexpected fails alone, with the type and message.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .processing import InvalidImageError, load_image
from .processing.images import check_min_size
from .results import failure_reason

log = logging.getLogger(__name__)


class Sample(NamedTuple):
    index: int
    image: torch.Tensor | None  # None when the input is not a usable image
    target: int
    error: str | None
    photo: Image.Image | None = None  # the decoded photo, when the dataset keeps them (``keep_photos``)


class Batch(NamedTuple):
    indices: list[int]  # of the images in ``images``
    images: torch.Tensor | None
    targets: torch.Tensor | None
    failed: list[tuple[int, str]]  # (index, reason) of the unusable inputs
    photos: list[Image.Image] | None = None  # the decoded photos of ``images``, when kept


class ImageListDataset(Dataset):
    """Images (paths, URLs or encoded bytes) by index, decoded by the hardened loader and ``transform``.

    ``min_size``: the short side ``transform`` resizes to (a preset's ``resize_size``): large photos
    are then decoded at reduced size, at least twice that (``load_image(min_size=...)``); None
    decodes every pixel. ``keep_photos``: each sample also holds its decoded photo (to draw on).
    """

    def __init__(
        self,
        items: Sequence[str | bytes],
        transform: Callable,
        targets: Sequence[int] | None = None,
        *,
        min_size: int | None = None,
        keep_photos: bool = False,
    ) -> None:
        check_min_size(min_size)
        self.keep_photos = keep_photos
        self.items = list(items)
        self.targets = list(targets) if targets is not None else [-1] * len(self.items)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        """The decoded, preprocessed image, or why not: any ``Exception`` stays with its input."""
        try:
            photo = load_image(self.items[index], min_size=self.min_size)
            image = self.transform(photo)
        except InvalidImageError as error:
            return Sample(index, None, self.targets[index], error.reason)
        except Exception as error:  # anything else the loader or the preset raised: this input only
            return Sample(index, None, self.targets[index], failure_reason(error))
        if not isinstance(image, torch.Tensor):
            reason = f"preprocessing gave a {type(image).__name__}, not a tensor"
            return Sample(index, None, self.targets[index], reason)
        return Sample(index, image, self.targets[index], None, photo if self.keep_photos else None)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the usable images; keep the reasons of the others.

    An image whose tensor has another shape than the batch's (the most common one) fails alone.
    """
    shapes = Counter(tuple(s.image.shape) for s in samples if s.image is not None)
    shape = shapes.most_common(1)[0][0] if shapes else None
    odd = {
        s.index: f"preprocessing gave a {'x'.join(map(str, s.image.shape))} tensor, the batch's are "
        f"{'x'.join(map(str, shape))}"
        for s in samples
        if s.image is not None and tuple(s.image.shape) != shape
    }
    samples = [s._replace(image=None, error=odd[s.index]) if s.index in odd else s for s in samples]
    good = [s for s in samples if s.image is not None]
    failed = [(s.index, s.error or "unreadable") for s in samples if s.image is None]
    if not good:
        return Batch([], None, None, failed)
    images = torch.stack([s.image for s in good])
    targets = torch.tensor([s.target for s in good], dtype=torch.long)
    photos = [s.photo for s in good] if all(s.photo is not None for s in good) else None
    return Batch([s.index for s in good], images, targets, failed, photos)


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
