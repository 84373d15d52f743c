"""Class lists: ImageNet-1k's names and WordNet ids shipped with the repo (never downloaded), and custom ones."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

CLASSES_PATH = Path(__file__).resolve().parent / "data" / "imagenet1k_classes.json"
IMAGENET_1K = "imagenet-1k"


@dataclass(frozen=True)
class ClassList:
    """The names of a model's output classes, by index; ``wnids`` (WordNet ids) where known."""

    names: tuple[str, ...]
    wnids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.names or not all(isinstance(name, str) for name in self.names):
            raise ValueError("a class list needs at least one class name, all strings")
        for name in self.names:
            problem = name_problem(name)
            if problem:
                raise ValueError(f"class name {ascii(name)} {problem}")
        if self.wnids is not None and len(self.wnids) != len(self.names):
            raise ValueError(f"{len(self.wnids)} WordNet ids for {len(self.names)} class names")

    @classmethod
    def of(cls, names: Sequence[str]) -> ClassList:
        """A custom class list (e.g. a fine-tuned head's)."""
        return cls(tuple(str(name) for name in names))

    def __len__(self) -> int:
        return len(self.names)

    def wnid(self, index: int) -> str | None:
        return self.wnids[index] if self.wnids is not None else None


# Characters a class name may not hold: it is written to label files (one per line), JSON, CSV and HTTP
# responses as text. Lone surrogates are bytes that were not UTF-8 (a file name's, via surrogateescape).
_NOT_TEXT = {"Cs": "bytes that are not UTF-8", "Cc": "a control character", "Zl": "a line break", "Zp": "a line break"}


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name (it must be valid UTF-8 text on one line), or None.

    Any other character is fine: accents, CJK, emoji (with their joiners), spaces, punctuation.
    """
    for char in name:
        kind = _NOT_TEXT.get(unicodedata.category(char))
        if kind:
            return f"holds {kind} ({ascii(char)}): a class name must be valid UTF-8 text on one line"
    return None


@cache
def imagenet_classes() -> ClassList:
    """ImageNet-1k in the standard order (0 = "tench, Tinca tinca"), as NVIDIA's label list spells them."""
    with open(CLASSES_PATH, encoding="utf-8") as handle:
        entries = json.load(handle)
    return ClassList(tuple(entry["name"] for entry in entries), tuple(entry["wnid"] for entry in entries))


KNOWN = {IMAGENET_1K: imagenet_classes}


def class_list(name: str) -> ClassList:
    """A shipped class list by its manifest name (``"imagenet-1k"``)."""
    if name not in KNOWN:
        raise ValueError(f"unknown class list {name!r}; expected one of {sorted(KNOWN)}")
    return KNOWN[name]()


def imagenet_wnids() -> list[str]:
    """WordNet ids by class index (``n01440764`` = 0)."""
    return list(imagenet_classes().wnids or ())


def imagenet_labels() -> list[str]:
    """Class names by class index, spelled as NVIDIA's label list ("tench, Tinca tinca")."""
    return list(imagenet_classes().names)


def get_imgnet_classes() -> np.ndarray:
    """NVIDIA's ``get_imgnet_classes()``: the 1000 class names as a numpy array."""
    return np.array(imagenet_labels())
