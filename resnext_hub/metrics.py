"""The one top-k meter: top-1/top-k hits and cross-entropy over batches of logits, summed over the ranks;
and the report's meter beside it: confusion matrix, per-class accuracy, calibration and temperature.

``evaluate`` and fine-tuning's validation both count with it, so "top-1" means the same thing in
both: the share of images whose highest logit is their class.
"""

from __future__ import annotations

import math
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


# -- the evaluation report: confusion matrix, per-class accuracy, calibration -------------------------------------

ECE_BINS = 15  # Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017), section 2 and table 1


def calibration_bins(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Sums per equal-width bin of the max softmax probability: a (3, bins) float64 tensor of image counts,
    summed confidences and correct top-1 counts. Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]``."""
    probabilities = torch.softmax(logits.double(), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    sums = torch.zeros(3, bins, dtype=torch.float64)
    sums[0].index_add_(0, which, torch.ones_like(confidence))
    sums[1].index_add_(0, which, confidence)
    sums[2].index_add_(0, which, (predicted == targets).double())
    return sums


def expected_calibration_error(sums: torch.Tensor) -> float | None:
    """ECE from :func:`calibration_bins` sums: the image-weighted mean of |accuracy - confidence| over the bins,
    as a fraction (0..1); None without images."""
    images = float(sums[0].sum())
    return float((sums[2] - sums[1]).abs().sum()) / images if images else None


def _nll_derivatives(
    logits: torch.Tensor, targets: torch.Tensor, beta: float, chunk: int = 4096
) -> tuple[float, float, float]:
    """Mean cross-entropy of ``beta * logits`` and its first and second derivatives in ``beta`` (float64,
    ``chunk`` rows at a time): ``E_p[z] - z_target`` and ``Var_p[z]`` averaged over the images."""
    nll = slope = curvature = 0.0
    for start in range(0, len(targets), chunk):
        z = logits[start : start + chunk].double()
        y = targets[start : start + chunk, None]
        log_p = torch.log_softmax(beta * z, dim=1)
        p = log_p.exp()
        mean = (p * z).sum(dim=1)
        nll -= float(log_p.gather(1, y).sum())
        slope += float((mean - z.gather(1, y)[:, 0]).sum())
        curvature += float(((p * z * z).sum(dim=1) - mean * mean).clamp(min=0).sum())
    return nll / len(targets), slope / len(targets), curvature / len(targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """The temperature ``T`` that minimises the mean cross-entropy of ``softmax(logits / T)`` on these images.

    The loss is convex in ``beta = 1/T`` (a log-sum-exp of linear functions minus a linear one), so
    Newton's method on ``beta`` converges in a few passes over the logits; a step that leaves the
    bracket known to hold the minimum is replaced by a (geometric) bisection of it. ``T`` is kept
    within ``bounds``: where the loss still falls at a bound (every image already right, say), the
    bound is returned.
    """
    if not len(targets):
        raise ValueError("fitting a temperature needs at least one image")
    low, high = 1 / bounds[1], 1 / bounds[0]  # the bracket, in beta
    beta = min(max(1.0, low), high)
    for _ in range(200):
        nll, slope, curvature = _nll_derivatives(logits, targets, beta)
        if nll == 0:  # every softmax one-hot on its target in float64: sharper only confirms it
            return bounds[0]
        if slope < 0:
            low = beta
        else:
            high = beta
        newton = beta - slope / curvature if curvature > 0 else math.nan
        if abs(newton - beta) <= 1e-12 * beta or high - low <= 1e-12 * high:
            break
        beta = newton if low < newton < high else math.sqrt(low * high)
    return 1 / min(max(beta, 1 / bounds[1]), 1 / bounds[0])


def mean_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """The mean cross-entropy of ``softmax(logits / temperature)`` (float64)."""
    return _nll_derivatives(logits, targets, 1 / temperature)[0]


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error (fraction, 0..1) and mean cross-entropy, before and after temperature scaling."""

    temperature: float
    ece: float
    ece_scaled: float
    nll: float
    nll_scaled: float
    bins: list[dict]  # per bin before scaling: range, images, mean confidence, accuracy (None when empty)


@dataclass(frozen=True)
class ReportCounts:
    """Everything the report says, summed over the ranks: the confusion matrix (rows: true class, columns:
    top-1 prediction, the model's class indices) and the calibration (None without images)."""

    confusion: torch.Tensor  # (classes, classes) int64
    calibration: Calibration | None

    def per_class(self) -> list[tuple[int, int, int]]:
        """``(class index, images, correct top-1)`` of every class that has images, by index."""
        images, correct = self.confusion.sum(dim=1), self.confusion.diagonal()
        return [(i, int(images[i]), int(correct[i])) for i in range(len(images)) if images[i] > 0]


class ReportMeter:
    """The confusion matrix, summed as batches stream; the logits for the calibration and the temperature fit.

    The confusion matrix streams (a (classes, classes) float64 matrix per rank, summed over the ranks:
    exact counts). The temperature is fitted by minimising the cross-entropy on the evaluated images
    themselves, so it needs all their logits: each rank keeps its images' float32 logits, and
    :meth:`merged` gathers them on rank 0 (images x classes x 4 bytes: 200 MB for ImageNet's 50,000
    validation images and 1,000 classes), which computes the calibration from them in the images'
    dataset order (the same float sums in 1 or N processes) and sends it to the other ranks.
    """

    def __init__(self, num_classes: int, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.kept: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor, indices: list[int]) -> None:
        """Count one batch: ``logits`` (N, classes), ``targets`` (N,), ``indices``: the images' places in the
        dataset (so the fit sees the images in the same order however many ranks scored them)."""
        logits, targets = logits.detach().float().cpu(), targets.cpu()
        flat = targets * self.confusion.shape[1] + logits.argmax(dim=1)
        self.confusion.view(-1).index_add_(0, flat, torch.ones(len(targets), dtype=torch.float64))
        self.kept.append((list(indices), logits, targets))

    def merged(self, ctx: DistContext | None = None) -> ReportCounts:
        """The counts of every rank and the calibration fitted on rank 0: the same on each rank."""
        confusion = ctx.all_reduce_sum(self.confusion) if ctx is not None else self.confusion
        parts = ctx.gather_object(self.kept) if ctx is not None else [self.kept]
        calibration = None
        batches = [batch for part in parts for batch in part] if parts is not None else []  # rank 0's only
        if batches:
            order = torch.tensor([i for indices, _, _ in batches for i in indices]).argsort()
            logits = torch.cat([logits for _, logits, _ in batches])[order]
            calibration = self._calibrate(logits, torch.cat([targets for _, _, targets in batches])[order])
        if ctx is not None:
            calibration = ctx.all_gather_object(calibration)[0]
        return ReportCounts(confusion.round().long(), calibration)

    def _binned(self, logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        sums = torch.zeros(3, self.bins, dtype=torch.float64)
        for start in range(0, len(targets), 4096):
            chunk = slice(start, start + 4096)
            sums += calibration_bins(logits[chunk] / temperature, targets[chunk], self.bins)
        return sums

    def _calibrate(self, logits: torch.Tensor, targets: torch.Tensor) -> Calibration:
        temperature = fit_temperature(logits, targets)
        sums = self._binned(logits, targets)
        edges = [(b / self.bins, (b + 1) / self.bins) for b in range(self.bins)]
        bins = [
            {
                "range": [low, high],
                "images": int(count),
                "confidence": float(confidence / count) if count else None,
                "accuracy": float(correct / count) if count else None,
            }
            for (low, high), count, confidence, correct in zip(edges, *sums.tolist())
        ]
        return Calibration(
            temperature=temperature,
            ece=expected_calibration_error(sums),
            ece_scaled=expected_calibration_error(self._binned(logits, targets, temperature)),
            nll=mean_nll(logits, targets),
            nll_scaled=mean_nll(logits, targets, temperature),
            bins=bins,
        )


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
