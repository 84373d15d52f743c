"""``evaluate``: top-1/top-5 and loss of a model on an ImageNet-val style folder, in 1 or N processes.

The folder holds one sub-folder per ImageNet class, named by its WordNet id (``n01440764/...``),
as ImageNet's validation set is usually laid out. Run it alone or under ``torchrun``::

    python -m resnext_hub evaluate /data/imagenet/val --model se_resnext101_32x4d
    torchrun --nproc_per_node=8 -m resnext_hub evaluate /data/imagenet/val --model se_resnext101_32x4d

Every image is counted exactly once whatever the number of processes; counts are summed
over the ranks and rank 0 prints (and writes) the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .arguments import add_model_options, add_progress_options, model_from_args
from .distributed import DistContext, current_context, distributed, shard_batches, sigterm_as_exit
from .inference import IMAGE_SUFFIXES
from .processing import InvalidImageError, imagenet_wnids, load_image

log = logging.getLogger(__name__)
EXIT_USAGE, EXIT_SOME_FAILED = 2, 1
_LISTED = 5


# -- data -------------------------------------------------------------------------------------------


def find_samples(root: str | Path, wnids: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``root/<wnid>/``, sorted by path.

    Class indices come from the ImageNet WordNet ids (``n01440764`` = 0), not from the sort
    order of the folders present, so a subset of the classes still scores against the right
    outputs. A folder that is not a WordNet id is refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist (or is not a folder)")
    index_of = {wnid: i for i, wnid in enumerate(wnids if wnids is not None else imagenet_wnids())}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index_of]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:_LISTED]) + (" ..." if len(unknown) > _LISTED else "")
        raise ValueError(
            f"{root} has {len(unknown)} folder(s) that are not ImageNet classes: {shown}. Expected one folder "
            "per ImageNet WordNet id (e.g. n01440764/), as ImageNet's validation set is laid out; "
            "see docs/distributed.md to sort the flat validation set into such folders"
        )
    samples = [
        (str(path), index_of[folder.name])
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not samples:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}/<wnid>/")
    return samples


class Sample(NamedTuple):
    index: int
    image: torch.Tensor | None  # None when the file is not a usable image
    target: int
    error: str | None


class Batch(NamedTuple):
    indices: list[int]  # of the images in ``images``
    images: torch.Tensor | None
    targets: torch.Tensor | None
    failed: list[tuple[int, str]]  # (index, reason) of the unusable files


class ImageListDataset(Dataset):
    """Images by index, decoded by the hardened loader; a bad file gives its reason, not an exception."""

    def __init__(self, items: Sequence[str], transform: Callable, targets: Sequence[int] | None = None) -> None:
        self.items = list(items)
        self.targets = list(targets) if targets is not None else [-1] * len(self.items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        try:
            image = self.transform(load_image(self.items[index]))
        except InvalidImageError as error:
            return Sample(index, None, self.targets[index], error.reason)
        return Sample(index, image, self.targets[index], None)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the usable images; keep the reasons of the others."""
    good = [s for s in samples if s.image is not None]
    failed = [(s.index, s.error or "unreadable") for s in samples if s.image is None]
    if not good:
        return Batch([], None, None, failed)
    images = torch.stack([s.image for s in good])
    targets = torch.tensor([s.target for s in good], dtype=torch.long)
    return Batch([s.index for s in good], images, targets, failed)


def make_loader(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int, device: torch.device) -> DataLoader:
    """A loader over exactly these batches of indices (no sampler padding), decoding in ``workers`` processes."""
    return DataLoader(
        dataset,
        batch_sampler=[list(batch) for batch in batches],
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


# -- model ------------------------------------------------------------------------------------------


def prepare_inference(
    model: torch.nn.Module,
    device: torch.device,
    *,
    exact: bool = False,
    compile: bool = False,
    ctx: DistContext | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function images -> fp32 logits on ``device``, and the precision it runs in.

    The model's fast path (``optimize_for_inference``): ``precision="auto"``, or ``"fp32"``
    with ``exact``. With ``ctx``, a rank whose "auto" choice differs from the others' is reported.
    """
    module = model.eval().to(device).optimize_for_inference(precision="fp32" if exact else "auto", compile=compile)
    precision = module.precision  # what "auto" chose

    chosen = sorted(set(ctx.all_gather_object(precision))) if ctx is not None else [precision]
    if len(chosen) > 1:  # e.g. mixed hardware: results would then depend on which rank got an image
        log.warning("the ranks run in different precisions %s; pass --exact to run all in fp32", chosen)
        precision = "+".join(chosen)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(device, non_blocking=True)).float()

    return run, precision


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr counting images, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr)


# -- evaluation -------------------------------------------------------------------------------------

# Per-rank running sums, reduced over ranks at the end.
_EVALUATED, _TOP1, _TOPK, _LOSS, _FAILED = range(5)


def evaluate(
    model: torch.nn.Module,
    root: str | Path,
    *,
    ctx: DistContext | None = None,
    batch_size: int = 64,
    workers: int = 4,
    exact: bool = False,
    compile: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on the ImageNet-layout folder ``root``; the same summary on every rank.

    Top-1/top-5 are percentages of the images that could be read; unreadable files are
    counted and listed under ``failures`` (``input``, ``error``), not scored.
    """
    ctx = ctx or current_context(next(model.parameters()).device)
    samples = find_samples(root)
    dataset = ImageListDataset([p for p, _ in samples], model.preprocessing, [t for _, t in samples])
    batches = shard_batches(len(samples), batch_size, ctx.rank, ctx.world_size)
    forward, precision = prepare_inference(model, ctx.device, exact=exact, compile=compile, ctx=ctx)
    k = min(5, model.num_classes)

    sums = torch.zeros(5, dtype=torch.float64)
    failures: list[tuple[int, str]] = []
    ctx.barrier()  # time the run, not the slowest rank's start-up
    started = time.perf_counter()
    loader = make_loader(dataset, batches, workers, ctx.device)
    bar = progress_bar(sum(len(b) for b in batches), progress and ctx.is_main)
    for batch in loader:
        failures += batch.failed
        sums[_FAILED] += len(batch.failed)
        if batch.images is not None:
            logits = forward(batch.images).cpu()
            targets = batch.targets
            ranked = logits.topk(k, dim=1).indices
            hits = ranked == targets[:, None]
            sums[_EVALUATED] += len(targets)
            sums[_TOP1] += hits[:, 0].sum().item()
            sums[_TOPK] += hits.any(dim=1).sum().item()
            sums[_LOSS] += F.cross_entropy(logits, targets, reduction="sum").item()
        if bar is not None:
            bar.update(len(batch.indices) + len(batch.failed))
    if bar is not None:
        bar.close()
    totals = ctx.all_reduce_sum(sums)
    all_failures = sorted(f for part in ctx.all_gather_object(failures) for f in part)
    seconds = time.perf_counter() - started

    evaluated, failed = int(totals[_EVALUATED]), int(totals[_FAILED])
    if evaluated + failed != len(samples):  # the sharding guarantees it; a broken guarantee must not pass silently
        raise RuntimeError(
            f"{evaluated} scored + {failed} failed != {len(samples)} images: a rank lost or repeated some"
        )
    record = model.weights_record
    published = record.accuracy if record is not None else {}
    return {
        "model": model.architecture or type(model).__name__,
        "weights": record.name if record is not None else None,
        "dataset": str(root),
        "images": len(samples),
        "evaluated": evaluated,
        "failed": failed,
        "correct_top1": int(totals[_TOP1]),
        "correct_top5": int(totals[_TOPK]),
        "top1": 100.0 * int(totals[_TOP1]) / evaluated if evaluated else None,
        "top5": 100.0 * int(totals[_TOPK]) / evaluated if evaluated else None,
        "loss": float(totals[_LOSS]) / evaluated if evaluated else None,
        "published": {key: published[key] for key in ("top1", "top5") if published.get(key) is not None},
        "images_per_second": len(samples) / seconds if seconds > 0 else None,
        "seconds": seconds,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "precision": precision,
        "batch_size": batch_size,
        "preprocessing": model.preprocessing.as_dict(),
        "failures": [{"input": samples[i][0], "error": reason} for i, reason in all_failures],
    }


# -- command line -----------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, weights, device and speed options shared by ``evaluate`` and ``predict``."""
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass, per process")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (0: in-process)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--exact", action="store_true", help="fp32 only (default: the fastest faithful precision)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (tens of seconds once)")
    add_progress_options(parser)


def check_model_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")


def load_model(args: argparse.Namespace, ctx: DistContext) -> torch.nn.Module:
    """The model named on the command line; rank 0 fetches the weights first, the others then read the cache."""
    with ctx.main_first():
        return model_from_args(args, progress=ctx.is_main)


def quiet_unless_main(ctx: DistContext) -> None:
    """Only rank 0 logs progress messages; the others keep warnings and errors."""
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_model_arguments(args)
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            find_samples(args.root)  # fail before the (slow) model load
            model = load_model(args, ctx)
            summary = evaluate(
                model,
                args.root,
                ctx=ctx,
                batch_size=args.batch_size,
                workers=args.workers,
                exact=args.exact,
                compile=args.compile,
                progress=bool(args.progress),
            )
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return EXIT_USAGE
        if not ctx.is_main:
            # Success: a non-zero status would make torchrun stop rank 0 before it has written the summary.
            return 0
        summary["checkpoint"] = args.checkpoint
        text = json.dumps(summary, indent=2)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(text)
        top1 = "n/a" if summary["top1"] is None else f"{summary['top1']:.3f}%"
        top5 = "n/a" if summary["top5"] is None else f"{summary['top5']:.3f}%"
        print(
            f"{summary['model']}: top-1 {top1}, top-5 {top5} on {summary['evaluated']} images "
            f"({summary['failed']} unreadable), {summary['images_per_second']:.1f} img/s, {ctx.world_size} process(es)",
            file=sys.stderr,
        )
        for failure in summary["failures"]:
            print(f"{failure['input']}: ERROR {failure['error']}", file=sys.stderr)
        return EXIT_SOME_FAILED if summary["failed"] else 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = commands.add_parser(
        "evaluate",
        help="top-1/top-5 on an ImageNet-val style folder (one sub-folder per WordNet id); works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="folder with one sub-folder of images per ImageNet WordNet id")
    add_model_arguments(parser)
    parser.add_argument("--output", "-o", help="also write the JSON summary to this file (rank 0)")
    parser.set_defaults(func=cmd_evaluate)
