"""Turning class scores into labels: NVIDIA's ``pick_n_best`` and a structured top-k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .labels import imagenet_labels, imagenet_wnids


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


def pick_n_best(predictions: torch.Tensor | np.ndarray, n: int = 5) -> list[list[tuple[str, str]]]:
    """NVIDIA's ``pick_n_best``: per sample, ``n`` pairs ``(class name, "12.3%")``, best first.

    ``predictions`` are probabilities of shape (N, 1000). Prints ``sample {i}: [...]`` per sample.
    """
    probabilities = _as_2d(predictions).numpy()
    labels = imagenet_labels()
    if probabilities.shape[1] != len(labels):
        raise ValueError(f"expected predictions over {len(labels)} ImageNet classes, got {probabilities.shape[1]}")
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
    labels: Sequence[str] | None = None,
) -> list[list[Prediction]]:
    """Per sample, the ``k`` best classes as :class:`Prediction` records.

    ``scores`` are probabilities, or logits with ``logits=True``. ``labels`` name the classes
    of a custom head (default: ImageNet-1k, which also gives WordNet ids).
    """
    scores = _as_2d(scores)
    probabilities = scores.softmax(1) if logits else scores
    names = list(labels) if labels is not None else imagenet_labels()
    if len(names) != probabilities.shape[1]:
        raise ValueError(f"{probabilities.shape[1]} classes in the scores but {len(names)} labels")
    wnids = imagenet_wnids() if labels is None else [None] * len(names)
    k = min(k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        [Prediction(int(i), wnids[i], names[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
        for row_p, row_i in zip(values, indices)
    ]
