"""Turning class scores into labels: NVIDIA's ``pick_n_best`` and a structured top-k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .labels import ClassList, imagenet_classes


class Prediction(NamedTuple):
    """One ranked class of one sample."""

    index: int
    wnid: str | None
    label: str
    probability: float


def _as_2d(scores: torch.Tensor | np.ndarray) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().float().cpu()
    if scores.dim() == 1:
        scores = scores[None]
    if scores.dim() != 2:
        raise ValueError(f"expected scores of shape (N, num_classes), got {tuple(scores.shape)}")
    return scores


def _classes(labels: ClassList | Sequence[str] | None) -> ClassList:
    if labels is None:
        return imagenet_classes()
    return labels if isinstance(labels, ClassList) else ClassList.of(labels)


def pick_n_best(
    predictions: torch.Tensor | np.ndarray, n: int = 5, *, labels: ClassList | Sequence[str] | None = None
) -> list[list[tuple[str, str]]]:
    """NVIDIA's ``pick_n_best``: per sample, ``n`` pairs ``(class name, "12.3%")``, best first.

    ``predictions`` are probabilities of shape (N, classes); ``labels`` name the classes
    (default: ImageNet-1k's 1000). Prints ``sample {i}: [...]`` per sample.
    """
    probabilities = _as_2d(predictions).numpy()
    labels = _classes(labels).names
    if probabilities.shape[1] != len(labels):
        raise ValueError(f"expected predictions over {len(labels)} classes, got {probabilities.shape[1]}")
    results = []
    for sample, row in enumerate(probabilities):
        best = np.argsort(-row)[:n]
        result = [(labels[i], f"{100 * float(row[i]):.1f}%") for i in best]
        print(f"sample {sample}: {result}")
        results.append(result)
    return results


def top_k(
    scores: torch.Tensor | np.ndarray,
    k: int = 5,
    *,
    logits: bool = False,
    labels: ClassList | Sequence[str] | None = None,
) -> list[list[Prediction]]:
    """Per sample, the ``k`` best classes as :class:`Prediction` records.

    ``scores`` are probabilities, or logits with ``logits=True``. ``labels`` name the classes
    (a model's ``.classes``; default: ImageNet-1k, which also gives WordNet ids).
    """
    scores = _as_2d(scores)
    probabilities = scores.softmax(1) if logits else scores
    classes = _classes(labels)
    if len(classes) != probabilities.shape[1]:
        raise ValueError(f"{probabilities.shape[1]} classes in the scores but {len(classes)} labels")
    k = min(k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        [
            Prediction(int(i), classes.wnid(i), classes.names[i], float(p))
            for p, i in zip(row_p.tolist(), row_i.tolist())
        ]
        for row_p, row_i in zip(values, indices)
    ]
