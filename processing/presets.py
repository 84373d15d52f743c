"""Input presets: the transform a model's weights expect, as one record (applied by :mod:`.transform`).

The presets themselves are declared once, in the ``presets`` table of ``weights_manifest.json``;
each weights record names the one it was trained with. ``"nvidia"`` (resize 256 bilinear, crop
224, ImageNet mean/std) is NVIDIA's ConvNets preprocessing and the default of the utilities.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import transform

MANIFEST_PATH = Path(__file__).resolve().parent.parent / "weights_manifest.json"
NVIDIA_PRESET = "nvidia"
INTERPOLATIONS = tuple(transform.RESAMPLE)
_FIELDS = ("resize_size", "crop_size", "interpolation", "mean", "std")


@dataclass(frozen=True)
class ImageClassification:
    """Resize the shorter side to ``resize_size`` (antialiased), center-crop ``crop_size``, scale to [0, 1], normalize.

    Call it on an RGB ``PIL.Image`` to get a float tensor ``(3, crop_size, crop_size)``; the arithmetic is
    :mod:`.transform`'s (PIL and numpy, also shipped into exported Triton repositories).
    """

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageClassification:
        """A preset from its manifest form (the fields of :meth:`as_dict`)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a preset is a mapping of {list(_FIELDS)}, got {type(data).__name__}")
        missing = [name for name in _FIELDS if data.get(name) is None]
        extra = sorted(set(data) - set(_FIELDS))
        if missing or extra:
            raise ValueError(f"a preset needs exactly {list(_FIELDS)}; missing {missing}, unknown {extra}")
        try:
            return cls(**{name: data[name] for name in _FIELDS})
        except TypeError as error:  # mean/std not iterable
            raise ValueError(f"malformed preset {dict(data)!r}: {error}") from error

    def as_dict(self) -> dict[str, Any]:
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in _FIELDS}

    def describe(self) -> str:
        """One line for people: what the transform does."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (
            f"resize the shorter side to {self.resize_size} ({self.interpolation}, antialiased), "
            f"center-crop {self.crop_size}x{self.crop_size}, scale to [0, 1], normalize (mean {mean}; std {std})"
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The preprocessed tensor (:func:`.transform.preprocess`); the work is bounded by the output size."""
        return torch.from_numpy(transform.preprocess(image, self.as_dict()))


def parse_presets(table: Any) -> dict[str, ImageClassification]:
    """The manifest's ``presets`` table: name -> preset (``ValueError`` naming the bad entry)."""
    if not isinstance(table, Mapping):
        raise ValueError(f"presets: expected a mapping of name -> preset, got {type(table).__name__}")
    presets = {}
    for name, entry in table.items():
        try:
            presets[name] = ImageClassification.from_dict(entry)
        except ValueError as error:
            raise ValueError(f"presets[{name!r}]: {error}") from None
    return presets


@cache
def manifest_presets(path: Path = MANIFEST_PATH) -> dict[str, ImageClassification]:
    """The presets declared in ``weights_manifest.json`` (read once per process)."""
    with open(path, encoding="utf-8") as handle:
        return parse_presets(json.load(handle).get("presets"))


def as_preset(preprocessing: Any = None) -> ImageClassification:
    """A preset from ``None`` (NVIDIA's), a preset, or anything carrying one as ``.preprocessing``.

    A model or a weights record carries its preset as ``.preprocessing``.
    """
    if preprocessing is None:
        return manifest_presets()[NVIDIA_PRESET]
    if isinstance(preprocessing, ImageClassification):
        return preprocessing
    found = getattr(preprocessing, "preprocessing", None)
    if isinstance(found, ImageClassification):
        return found
    raise TypeError(
        "preprocessing must be None (NVIDIA's), an ImageClassification preset, or a model or weights record "
        f"with a .preprocessing preset; got {type(preprocessing).__name__}"
    )
