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
import sys
from pathlib import Path

from .. import exit_codes
from ..arguments import (
    add_inference_options,
    add_model_options,
    add_progress_options,
    calibration_from_args,
    model_from_args,
    precision_from_args,
)
from ..data import find_samples
from ..distributed import distributed, quiet_unless_main, sigterm_as_exit
from ..evaluate import evaluate


def run(args: argparse.Namespace) -> int:
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            find_samples(args.root)  # fail before the (slow) model load
            summary = evaluate(
                model_from_args(args, ctx=ctx),
                args.root,
                ctx=ctx,
                batch_size=args.batch_size,
                workers=args.workers,
                exact=args.exact,
                precision=precision_from_args(args),
                calibration=calibration_from_args(args),
                compile=args.compile,
                progress=bool(args.progress),
            )
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return exit_codes.USAGE
        if not ctx.is_main:
            # Success: a non-zero status would make torchrun stop rank 0 before it has written the summary.
            return exit_codes.OK
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
        return exit_codes.SOME_FAILED if summary["failed"] else exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 on an ImageNet-val style folder (one sub-folder per WordNet id); works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="folder with one sub-folder of images per ImageNet WordNet id")
    add_model_options(parser)
    add_inference_options(parser, batch_size=64, top_k=False, per_process=True)
    add_progress_options(parser)
    parser.add_argument("--output", "-o", help="also write the JSON summary to this file (rank 0)")
    parser.set_defaults(func=run)
