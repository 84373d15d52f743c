"""The one top-k meter: top-1/top-k hits and cross-entropy over batches of logits, summed over the ranks.

``evaluate`` and fine-tuning's validation both count with it, so "top-1" means the same thing in
both: the share of images whose highest logit is their class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .distributed import DistContext


@dataclass(frozen=True)
class TopK:
    """Counts over some images: how many, how many had their class first / among the top ``k``, summed loss."""

    images: int
    top1: int
    topk: int
    loss_sum: float
    k: int

    @property
    def top1_percent(self) -> float | None:
        return 100.0 * self.top1 / self.images if self.images else None

    @property
    def topk_percent(self) -> float | None:
        return 100.0 * self.topk / self.images if self.images else None

    @property
    def loss(self) -> float | None:
        """The mean (plain, unsmoothed) cross-entropy."""
        return self.loss_sum / self.images if self.images else None


class TopKMeter:
    """Running sums of one rank (float64, on ``device``: no host sync per batch); :meth:`merged` sums the ranks.

    ``k`` is clamped to the class count (a 3-class model's "top-5" is its top-3).
    """

    def __init__(self, num_classes: int, k: int = 5, device: torch.device | str = "cpu") -> None:
        self.k = min(k, num_classes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1, top-k, loss

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch: ``logits`` (N, classes), ``targets`` (N,) class indices."""
        logits = logits.float()
        hits = logits.topk(self.k, dim=1).indices == targets[:, None]
        self.sums[0] += len(targets)
        self.sums[1] += hits[:, 0].sum()
        self.sums[2] += hits.any(dim=1).sum()
        self.sums[3] += F.cross_entropy(logits, targets, reduction="sum")

    def merged(self, ctx: DistContext | None = None) -> TopK:
        """The counts summed over every rank of ``ctx`` (the same on each); this rank's without one."""
        sums = (ctx.all_reduce_sum(self.sums) if ctx is not None else self.sums.cpu()).tolist()
        return TopK(int(sums[0]), int(sums[1]), int(sums[2]), sums[3], self.k)


# -- multi-label: average precision and per-label thresholds -------------------------------------------


def average_precisions(scores: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """Per label, the average precision of ``scores`` (N, labels) against 0/1 ``targets`` (N, labels).

    AP = sum over the distinct scores, highest first, of (recall gained there) x (precision there), images
    with equal scores counting together (as scikit-learn's ``average_precision_score``). None for a label
    with no positive image (its AP is undefined).
    """
    scores, targets = scores.double().cpu(), targets.double().cpu()
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"expected scores and targets of one shape (N, labels), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")  # fmt: skip
    results: list[float | None] = []
    for column, truth in zip(scores.T, targets.T):
        positives = float(truth.sum())
        if positives == 0:
            results.append(None)
            continue
        order = column.argsort(descending=True, stable=True)
        ranked, hits = column[order], truth[order]
        true_positives = hits.cumsum(0)
        # The last image of each run of equal scores: where a threshold at that score cuts.
        last = torch.ones(len(ranked), dtype=torch.bool)
        last[:-1] = ranked[1:] != ranked[:-1]
        tp = true_positives[last]
        seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64)[last]
        recall = tp / positives
        precision = tp / seen
        gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
        results.append(float((gained * precision).sum()))
    return results


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Macro mAP: the mean of :func:`average_precisions` over the labels with a positive image (None if none has)."""
    defined = [ap for ap in average_precisions(scores, targets) if ap is not None]
    return sum(defined) / len(defined) if defined else None


DEFAULT_THRESHOLD = 0.5  # a label with no positive validation image, which has no F1 to maximise


def f1_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the probability threshold that maximises its F1 on these images (``p >= t``: present).

    The threshold is halfway between the lowest probability kept and the highest one left out (the fewest
    images kept, among ties of F1); :data:`DEFAULT_THRESHOLD` for a label with no positive image.
    """
    probabilities, targets = probabilities.double().cpu(), targets.double().cpu()
    thresholds = []
    for column, truth in zip(probabilities.T, targets.T):
        positives = float(truth.sum())
        if positives == 0:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        ranked, order = column.sort(descending=True, stable=True)
        tp = truth[order].cumsum(0)
        kept = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
        f1 = 2 * tp / (kept + positives)
        cut = torch.ones(len(ranked), dtype=torch.bool)  # only between distinct probabilities
        cut[:-1] = ranked[1:] != ranked[:-1]
        f1[~cut] = -1
        best = int(f1.argmax())  # the first maximum: the fewest images kept
        below = float(ranked[best + 1]) if best + 1 < len(ranked) else 0.0
        thresholds.append((float(ranked[best]) + below) / 2)
    return thresholds


def f1_scores(chosen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, the F1 of 0/1 decisions ``chosen`` against 0/1 ``targets`` (N, labels); 0 where both are empty."""
    chosen, targets = chosen.bool().cpu(), targets.bool().cpu()
    hits = (chosen & targets).sum(0).double()
    return 2 * hits / (chosen.sum(0) + targets.sum(0)).clamp(min=1)
