"""ImageNet-1k class names and WordNet ids, shipped with the repo (never downloaded)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

CLASSES_PATH = Path(__file__).resolve().parent / "data" / "imagenet1k_classes.json"


@cache
def _classes() -> tuple[tuple[str, str], ...]:
    with open(CLASSES_PATH, encoding="utf-8") as handle:
        entries = json.load(handle)
    return tuple((entry["wnid"], entry["name"]) for entry in entries)


def imagenet_wnids() -> list[str]:
    """WordNet ids by class index (``n01440764`` = 0)."""
    return [wnid for wnid, _ in _classes()]


def imagenet_labels() -> list[str]:
    """Class names by class index, spelled as NVIDIA's label list ("tench, Tinca tinca")."""
    return [name for _, name in _classes()]


def get_imgnet_classes() -> np.ndarray:
    """NVIDIA's ``get_imgnet_classes()``: the 1000 class names as a numpy array."""
    return np.array(imagenet_labels())
