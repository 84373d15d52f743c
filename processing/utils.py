"""NVIDIA's processing utilities (same calls, same results) plus batch helpers for programs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .images import ImageSource, load_image
from .labels import ClassList, get_imgnet_classes
from .overlay import overlay
from .predictions import Prediction, pick_n_best, top_k
from .presets import as_preset


def prepare_input_from_uri(uri: ImageSource, cuda: bool = False, *, preprocessing: Any = None) -> torch.Tensor:
    """NVIDIA's ``prepare_input_from_uri``: a ``(1, 3, 224, 224)`` input from a URL or path.

    Any image mode is converted to RGB; bad input raises ``InvalidImageError`` (a
    ``ValueError``). ``preprocessing`` (a preset, or a model or weights record carrying one)
    overrides NVIDIA's default transform (resize 256 bilinear, crop 224, ImageNet mean/std).
    """
    tensor = as_preset(preprocessing)(load_image(uri))[None]
    return tensor.cuda() if cuda else tensor


def prepare_batch(
    images: Iterable[ImageSource],
    *,
    device: torch.device | str | None = None,
    preprocessing: Any = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Stack URLs, paths, bytes or ``PIL.Image`` objects into one ``(N, 3, H, W)`` batch."""
    preset = as_preset(preprocessing)
    tensors = [preset(load_image(image)) for image in images]
    if not tensors:
        raise ValueError("prepare_batch needs at least one image")
    batch = torch.stack(tensors)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch if device is None else batch.to(device, non_blocking=True)


class ConvNetsProcessingUtils:
    """What ``nvidia_convnets_processing_utils`` returns: NVIDIA's three calls and helpers.

    ``preprocessing`` (a preset, or a model or weights record) replaces NVIDIA's default
    transform; a model also gives its class names to ``pick_n_best`` and ``top_k``.
    """

    def __init__(self, preprocessing: Any = None) -> None:
        self.preprocessing = as_preset(preprocessing)
        classes = getattr(preprocessing, "classes", None)
        self.classes: ClassList | None = classes if isinstance(classes, ClassList) else None

    def prepare_input_from_uri(self, uri: ImageSource, cuda: bool = False) -> torch.Tensor:
        return prepare_input_from_uri(uri, cuda, preprocessing=self.preprocessing)

    def prepare_batch(self, images: Iterable[ImageSource], **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("preprocessing", self.preprocessing)
        return prepare_batch(images, **kwargs)

    def pick_n_best(self, predictions: torch.Tensor | np.ndarray, n: int = 5) -> list[list[tuple[str, str]]]:
        return pick_n_best(predictions, n, labels=self.classes)

    @staticmethod
    def get_imgnet_classes() -> np.ndarray:
        return get_imgnet_classes()

    def top_k(self, scores: torch.Tensor | np.ndarray, k: int = 5, **kwargs: Any) -> list[list[Prediction]]:
        kwargs.setdefault("labels", self.classes)
        return top_k(scores, k, **kwargs)

    load_image = staticmethod(load_image)

    def overlay(self, photo: Any, heat: Any, *, alpha: float = 0.5) -> Any:
        """``photo`` (a ``PIL.Image``) with an explanation map (``model.explain(batch)[i]``) blended over the part
        this preprocessing's crop showed the model, at the photo's size (:func:`.overlay.overlay`)."""
        return overlay(photo, heat, self.preprocessing, alpha=alpha)


def nvidia_convnets_processing_utils(preprocessing: Any = None) -> ConvNetsProcessingUtils:
    """NVIDIA's processing utilities: ``prepare_input_from_uri``, ``pick_n_best``, ``get_imgnet_classes``.

    Also ``prepare_batch`` (many images, a device), ``top_k`` (index, wnid, label,
    probability) and ``overlay`` (an explanation map of ``model.explain`` drawn over its photo).
    Pass ``preprocessing=model`` to use that model's input transform and class names.

    Example::

        utils = torch.hub.load("<org>/resnext-hub", "nvidia_convnets_processing_utils", trust_repo=True)
        batch = torch.cat([utils.prepare_input_from_uri(uri) for uri in uris])
        utils.pick_n_best(predictions=torch.softmax(model(batch), dim=1), n=5)
    """
    return ConvNetsProcessingUtils(preprocessing)
