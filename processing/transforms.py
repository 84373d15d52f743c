"""Input transforms built from a model's (or weights') preprocessing record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torchvision import transforms as T

_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


class PreprocessingSpec(NamedTuple):
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``, normalize."""

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# NVIDIA's ConvNets preprocessing, the default of every NVIDIA entry point.
NVIDIA = PreprocessingSpec(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FIELDS = PreprocessingSpec._fields


def resolve_spec(preprocessing: Any = None) -> PreprocessingSpec:
    """A spec from ``None`` (NVIDIA's), a model (its ``.preprocessing``), a mapping or a record."""
    if preprocessing is None:
        return NVIDIA
    if isinstance(preprocessing, PreprocessingSpec):
        return preprocessing
    if isinstance(preprocessing, torch.nn.Module):
        found = getattr(preprocessing, "preprocessing", None)
        if found is None:
            raise ValueError(f"{type(preprocessing).__name__} has no .preprocessing record; pass one explicitly")
        return resolve_spec(found)
    if isinstance(preprocessing, Mapping):
        values = preprocessing
    else:
        values = {name: getattr(preprocessing, name, None) for name in _FIELDS}
    missing = [name for name in _FIELDS if values.get(name) is None]
    if missing:
        raise ValueError(f"preprocessing needs {list(_FIELDS)}; {missing} missing from {preprocessing!r}")
    if values["interpolation"] not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {list(_INTERPOLATION)}, got {values['interpolation']!r}")
    return PreprocessingSpec(
        int(values["resize_size"]),
        int(values["crop_size"]),
        str(values["interpolation"]),
        tuple(float(v) for v in values["mean"]),  # type: ignore[arg-type]
        tuple(float(v) for v in values["std"]),  # type: ignore[arg-type]
    )


def build_transform(preprocessing: Any = None) -> T.Compose:
    """``PIL.Image`` (RGB) -> normalized float tensor ``(3, crop, crop)``."""
    spec = resolve_spec(preprocessing)
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=_INTERPOLATION[spec.interpolation]),
            T.CenterCrop(spec.crop_size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
