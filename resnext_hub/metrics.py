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
