"""``finetune``: train a model on your own classes, in one process or under ``torchrun``.

DATA holds ``train/<class>/...`` and ``val/<class>/...`` (the same class folders; any image format
the loader reads; unreadable files are reported and skipped). OUT receives ``best.pth`` and
``last.pth`` (after every epoch), ``metrics.jsonl`` and ``curves.png``::

    python -m resnext_hub finetune DATA --model seresnext26d_32x4d -o runs/mine
    torchrun --nproc_per_node=4 -m resnext_hub finetune DATA --model seresnext26d_32x4d -o runs/mine
    python -m resnext_hub finetune DATA -o runs/mine --resume       # continue a killed run
    python -m resnext_hub classify photo.jpg --model seresnext26d_32x4d --checkpoint runs/mine/best.pth

Multi-label (--multi-label): each image has any number of labels, listed in CSV files (by default
DATA/train.csv and DATA/val.csv; --labels and --val-labels name others). One line per image,
``path,labels``: the path relative to the CSV file's folder, the labels separated by ``;``; the header
line ``path,labels`` is optional; an empty labels field means none of the labels::

    path,labels
    images/0001.png,circle;square
    images/0002.jpg,triangle
    images/0003.png,

The model gets a sigmoid per label, trained with binary cross-entropy; validation records the mean
average precision (val_map, %) in metrics.jsonl and chooses each label's threshold (the one that
maximises its F1 on the validation images), saved in best.pth with the labels: classify, predict,
export and serve then give each label's probability and the labels above their thresholds.

The recipe (AdamW, warmup + cosine, label smoothing, mixed precision) is described in
``resnext_hub/training/loop.py``. With ``--resume`` the run's own settings are used; options given
must agree with them. OUT is checked before any work (a writable folder, holding no other run unless
``--resume``) and locked while the run writes it (``OUT/.lock``). Exit status: 0; 1 when images or
folders were skipped, or a file could not be written (a full disk: the epochs saved before are kept);
2 for bad options, data or output folders; 130 interrupted (nothing half-written is left).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .. import exit_codes
from ..arguments import add_progress_options
from ..console import printable
from ..distributed import DistContext, distributed, quiet_unless_main, sigterm_as_exit
from ..models import WeightsUnavailableError
from ..models.registry import model_names
from ..options import default_workers
from ..training import FIELDS, MIN_IMAGE_SIZE, PRECISIONS, FinetuneSettings, finetune
from ..training.state import OutputWriteError

DEFAULTS = FinetuneSettings()


def _settings(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given, the default or the resumed run's)."""
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if args.global_batch_size is not None:
        given["batch_size"] = args.global_batch_size
    if args.no_pretrained:
        given["pretrained"] = False
    return given


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers given, if anything (for ``parser.error``: exit 2)."""
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.global_batch_size)):
        if value is not None and value < 1:
            return f"{option} must be at least 1, got {value}"
    for name in ("lr", "weight_decay", "warmup"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (name == "lr" and value == 0)):
            return (
                f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}"
            )
    if args.warmup is not None and args.warmup >= 1:
        return f"--warmup is a fraction of the steps, below 1; got {args.warmup}"
    if args.image_size is not None and args.image_size < MIN_IMAGE_SIZE:
        return f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}"
    if args.seed is not None and args.seed < 0:
        return f"--seed must be at least 0, got {args.seed}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check(args)
    if problem:
        raise ValueError(problem)  # the CLI prints it: exit 2
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            summary = finetune(
                args.data,
                args.output,
                resume=args.resume,
                workers=args.workers,
                progress=bool(args.progress),
                ctx=ctx,
                **_settings(args),
            )
        except (ValueError, WeightsUnavailableError) as error:  # refused before training, on every rank
            return _stop(ctx, error, exit_codes.USAGE)
        except OutputWriteError as error:  # a file could not be written (a full disk); every rank stopped
            return _stop(ctx, error, exit_codes.SOME_FAILED)
        if not ctx.is_main:
            return exit_codes.OK  # rank 0 reports; a non-zero status here would make torchrun stop it first
        print(json.dumps(summary, indent=2))
        if summary["skipped"]:
            print(f"{len(summary['skipped'])} unreadable image(s) skipped (listed above)", file=sys.stderr)
        if summary["skipped_folders"]:
            print(
                f"warning: {len(summary['skipped_folders'])} folder(s) could not be read: their images were not used",
                file=sys.stderr,
            )
        return exit_codes.SOME_FAILED if summary["skipped"] or summary["skipped_folders"] else exit_codes.OK


def _stop(ctx: DistContext, error: Exception, status: int) -> int:
    """Rank 0 prints the one ``error:`` line; every rank (all stopped at the same point) then exits with
    ``status``, after rank 0 has printed: ``torchrun`` stops the others when the first one exits."""
    if ctx.is_main:
        print(f"error: {printable(error, backslashes=False)}", file=sys.stderr, flush=True)
    ctx.barrier()
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on your own classes (DATA/train/<class>/, DATA/val/<class>/); works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data", help="folder with train/<class>/ and val/<class>/ image folders (--multi-label: train.csv, val.csv)"
    )
    parser.add_argument(
        "--output", "-o", metavar="OUT", required=True, help="folder for checkpoints, metrics.jsonl and curves.png"
    )
    names = sorted(model_names())
    parser.add_argument("--model", metavar="NAME", choices=names, help=f"default {DEFAULTS.model}: {', '.join(names)}")
    parser.add_argument("--epochs", type=int, help=f"default {DEFAULTS.epochs}")
    parser.add_argument(
        "--batch-size",
        dest="global_batch_size",
        metavar="N",
        type=int,
        help=f"GLOBAL batch, split over the processes (default {DEFAULTS.batch_size})",
    )
    parser.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {DEFAULTS.lr:g})")
    parser.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {DEFAULTS.weight_decay:g})")
    parser.add_argument("--warmup", type=float, help=f"fraction of the steps warming up (default {DEFAULTS.warmup:g})")
    parser.add_argument("--image-size", type=int, help="training/validation crop (default: the weights' own)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained-from-file", metavar="FILE", help="start from this checkpoint file")
    weights.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    parser.add_argument("--freeze-backbone", action="store_true", default=None, help="train the head only")
    parser.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes (CUDA)")
    parser.add_argument("--precision", choices=PRECISIONS, help="default auto: bf16/fp16 where the hardware has it")
    parser.add_argument("--seed", type=int, help=f"data order and augmentation (default {DEFAULTS.seed})")
    parser.add_argument(
        "--multi-label",
        action="store_true",
        default=None,
        help="images with any number of labels, from CSV files (path,labels with labels separated by ';'): "
        "a sigmoid head, binary cross-entropy, mAP, per-label thresholds",
    )
    parser.add_argument(
        "--labels", metavar="FILE.csv", help="with --multi-label: the training images' labels (default DATA/train.csv)"
    )
    parser.add_argument(
        "--val-labels", metavar="FILE.csv", help="with --multi-label: the validation images' (default DATA/val.csv)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="data-loading processes per rank (0: in-process; default: the usable CPUs, shared by the ranks)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    add_progress_options(parser)
    parser.set_defaults(func=run)
