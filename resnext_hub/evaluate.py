"""Top-1/top-5 and loss of a model on a class-folder dataset, in 1 or N processes (``torchrun``).

The dataset holds one sub-folder per class, named after one of the model's classes: its class name
(a fine-tuned model's own folders) or, for ImageNet-1k models, its WordNet id (``n01440764/``, as
ImageNet's validation set is laid out); :func:`resnext_hub.data.match_classes` has the rules.
ImageNet's flat validation folder is read with a ground-truth file instead (``ground_truth``:
:func:`resnext_hub.data.read_ground_truth`). Every image is counted exactly once whatever the number
of processes; the counts are summed over the ranks, so every rank returns the same summary.
With ``report=True`` the summary also holds the evaluation report (:mod:`resnext_hub.report`).
A multi-label model is scored on a labels file instead (:func:`evaluate_multi_label`: mAP, F1 at
its thresholds).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .console import printable, progress_bar
from .data import Skipped, find_samples
from .distributed import DistContext, agreed_precision, current_context, shard_batches
from .engine import Engine, resolve_device
from .labels_csv import read_labels_csv
from .metrics import ReportMeter, TopKMeter, average_precisions, f1_scores, mean_average_precision
from .models import ResNet
from .options import InferenceOptions
from .report import report_contents


def evaluate(
    model: ResNet,
    root: str | Path,
    options: InferenceOptions | None = None,
    *,
    ctx: DistContext | None = None,
    ground_truth: str | Path | None = None,
    report: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on the class folders of ``root`` (``root/<class>/``) as ``options`` say (``top_k``
    aside: top-1 and top-5 are counted); the same summary on every rank. ``ctx``: the process group
    (default: the caller's, else one process on ``options.device``).

    Sub-folders are matched to ``model.classes`` (a ``ValueError`` names those that match none);
    a subset of the classes is scored against the model's own outputs.

    Top-1/top-5 are percentages of the images that could be read; unreadable files are
    counted and listed under ``failures`` (``input``, ``error``), not scored. Folders that could
    not be read are listed under ``skipped`` (``path``, ``reason``): their images are not counted
    at all, so a non-empty ``skipped`` means the numbers are of a subset.

    ``ground_truth``: ``root`` is a flat folder of images labelled by this file, one line per image
    in file-name order (ImageNet's ``ILSVRC2012_validation_ground_truth.txt``, or WordNet ids).
    ``report``: also count the confusion matrix, per-class accuracy and calibration, under ``report``
    (:func:`resnext_hub.report.report_contents`; :func:`resnext_hub.report.write_report` writes it).
    """
    options = options or InferenceOptions()
    ctx = ctx or current_context(resolve_device(options.device))
    skipped: list[Skipped] = []
    samples = find_samples(root, model.classes, skipped=skipped, ground_truth=ground_truth)
    batches = shard_batches(len(samples), options.batch_size, ctx.rank, ctx.world_size)
    engine = Engine(model, dataclasses.replace(options, device=ctx.device))
    precision = agreed_precision(ctx, engine.precision)
    meter = TopKMeter(model.num_classes)
    report_meter = ReportMeter(model.num_classes) if report else None
    failures: list[tuple[int, str]] = []
    ctx.barrier()  # time the run, not the slowest rank's start-up
    started = time.perf_counter()
    bar = progress_bar(sum(len(b) for b in batches), options.progress and ctx.is_main)
    paths, classes = [p for p, _ in samples], [c for _, c in samples]
    for scored in engine.score(paths, batches, targets=classes):
        failures += scored.failed
        if scored.logits is not None:
            meter.update(scored.logits, scored.targets)
            if report_meter is not None:
                report_meter.update(scored.logits, scored.targets, scored.indices)
        if bar is not None:
            bar.update(len(scored.indices) + len(scored.failed))
    if bar is not None:
        bar.close()
    totals = meter.merged(ctx)
    report_counts = report_meter.merged(ctx) if report_meter is not None else None
    all_failures = sorted(f for part in ctx.all_gather_object(failures) for f in part)
    seconds = time.perf_counter() - started

    evaluated, failed = totals.images, len(all_failures)
    if evaluated + failed != len(samples):  # the sharding guarantees it; a broken guarantee must not pass silently
        raise RuntimeError(
            f"{evaluated} scored + {failed} failed != {len(samples)} images: a rank lost or repeated some"
        )
    record = model.weights_record
    published = record.accuracy if record is not None else {}
    summary = {
        "model": model.architecture or type(model).__name__,
        "weights": record.name if record is not None else None,
        "dataset": str(root),
        **({"ground_truth": str(ground_truth)} if ground_truth is not None else {}),
        "images": len(samples),
        "evaluated": evaluated,
        "failed": failed,
        "correct_top1": totals.top1,
        "correct_top5": totals.topk,
        "top1": totals.top1_percent,
        "top5": totals.topk_percent,
        "loss": totals.loss,
        "published": {key: published[key] for key in ("top1", "top5") if published.get(key) is not None},
        **_run(model, ctx, options, precision, seconds, len(samples)),
        "failures": [{"input": samples[i][0], "error": reason} for i, reason in all_failures],
        "skipped": [entry._asdict() for entry in skipped],
    }
    if report_counts is not None:
        summary["report"] = report_contents(summary, report_counts, model.classes)
    return summary


def evaluate_multi_label(
    model: ResNet,
    labels_file: str | Path,
    options: InferenceOptions | None = None,
    *,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Score a multi-label ``model`` on the images of a labels file (``path,labels``, the format of
    :mod:`resnext_hub.labels_csv`): mAP and per-label average precision, macro F1 at the model's own
    thresholds, binary cross-entropy, in % where a share; the same summary on every rank.

    ``ValueError`` for a single-label model, a bad labels file, or a label the model does not have.
    """
    if not model.multi_label:
        raise ValueError(
            f"{printable(labels_file)} is a labels file, for multi-label models; this model is single-label: "
            "give it a folder of class folders"
        )
    options = options or InferenceOptions()
    ctx = ctx or current_context(resolve_device(options.device))
    images = read_labels_csv(labels_file)
    rows = images.multi_hot(model.classes.names, "the model's labels")
    batches = shard_batches(len(images), options.batch_size, ctx.rank, ctx.world_size)
    engine = Engine(model, dataclasses.replace(options, device=ctx.device))
    precision = agreed_precision(ctx, engine.precision)
    parts: list[tuple[torch.Tensor, list[int]]] = []
    failures: list[tuple[int, str]] = []
    ctx.barrier()
    started = time.perf_counter()
    for scored in engine.score(images.paths, batches, targets=range(len(images))):
        failures += scored.failed
        if scored.logits is not None:
            parts.append((scored.logits, scored.indices))
    gathered = [part for rank in ctx.all_gather_object(parts) for part in rank]
    all_failures = sorted(f for part in ctx.all_gather_object(failures) for f in part)
    seconds = time.perf_counter() - started
    logits = torch.cat([logits for logits, _ in gathered]) if gathered else torch.empty(0, rows.shape[1])
    targets = rows[[i for _, indices in gathered for i in indices]]
    probabilities = logits.sigmoid()
    precisions = average_precisions(probabilities, targets)
    score = mean_average_precision(probabilities, targets)
    f1 = f1_scores(probabilities >= torch.tensor(model.thresholds), targets)
    evaluated = len(logits)
    return {
        "model": model.architecture or type(model).__name__,
        "dataset": str(labels_file),
        "multi_label": True,
        "images": len(images),
        "evaluated": evaluated,
        "failed": len(all_failures),
        "map": None if score is None else 100 * score,
        "f1": 100 * float(f1.mean()) if evaluated else None,
        "loss": float(F.binary_cross_entropy_with_logits(logits, targets)) if evaluated else None,
        "average_precision": {
            name: None if ap is None else 100 * ap for name, ap in zip(model.classes.names, precisions)
        },
        "thresholds": dict(zip(model.classes.names, model.thresholds)),
        **_run(model, ctx, options, precision, seconds, len(images)),
        "failures": [{"input": images.paths[i], "error": reason} for i, reason in all_failures],
        "skipped": [],
    }


def _run(
    model: ResNet, ctx: DistContext, options: InferenceOptions, precision: str, seconds: float, images: int
) -> dict[str, Any]:
    """The summary's account of the run itself (speed, processes, device, precision, preprocessing)."""
    return {
        "images_per_second": images / seconds if seconds > 0 else None,
        "seconds": seconds,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "precision": precision,
        "batch_size": options.batch_size,
        "preprocessing": model.preprocessing.as_dict(),
    }
