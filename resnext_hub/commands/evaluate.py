"""``evaluate``: top-1/top-5 and loss of a model on a folder of class folders, in 1 or N processes.

The folder holds one sub-folder of images per class, named after one of the model's classes: its
name (``DATA/val/<class>/`` of ``finetune``, with that run's checkpoint), or for ImageNet models its
WordNet id (``n01440764/...``), as ImageNet's validation set is usually laid out. A folder that
matches no class is an error (exit 2) naming it; a name in another letter case matches when only
one class does. Run it alone or under ``torchrun``::

    python -m resnext_hub evaluate /data/imagenet/val --model se_resnext101_32x4d
    torchrun --nproc_per_node=8 -m resnext_hub evaluate /data/imagenet/val --model se_resnext101_32x4d
    python -m resnext_hub evaluate DATA/val --model seresnext26d_32x4d --checkpoint runs/mine/best.pth

ImageNet's validation set as its archive unpacks (one flat folder of 50,000 images) is read with
the devkit's ground-truth file, one label per image in file-name order (``--ground-truth``)::

    python -m resnext_hub evaluate ILSVRC2012_img_val/ --model se_resnext101_32x4d \\
        --ground-truth ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt

``--report DIR`` also writes per-class accuracy, the confusion matrix (``report.json``,
``confusion_matrix.png``) and the calibration (ECE before and after temperature scaling).

A multi-label model (``finetune --multi-label``) is scored on a labels file instead of class folders
(``path,labels``, as finetune reads them): mAP, per-label average precision, macro F1 at the model's
thresholds, binary cross-entropy::

    python -m resnext_hub evaluate DATA/val.csv --model seresnext26d_32x4d --checkpoint runs/multi/best.pth

Every image is counted exactly once whatever the number of processes; counts are summed
over the ranks and rank 0 prints (and writes) the JSON summary and the report. The summary is
printed first, so an ``--output`` that fails to be written (checked before the model loads) loses nothing. Folders
that could not be read are listed under ``skipped`` and make the exit status 1, as unreadable
images do: the numbers are then of a subset.
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
    inference_options,
    model_from_args,
)
from ..console import printable
from ..data import Skipped, read_class_folders
from ..distributed import distributed, quiet_unless_main, sigterm_as_exit
from ..evaluate import evaluate, evaluate_multi_label
from ..labels_csv import read_labels_csv
from ..outputs import check_output
from ..report import REPORT_JSON, write_report


def run(args: argparse.Namespace) -> int:
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            labels_file = Path(args.root).suffix.lower() == ".csv"
            if labels_file:  # a multi-label model's images and labels
                if args.ground_truth is not None or args.report is not None:
                    raise ValueError(
                        "--ground-truth and --report are for single-label models and folders of images; a labels "
                        "file (.csv) is scored by mAP and F1 without them"
                    )
                read_labels_csv(args.root)
            elif args.ground_truth is None:
                read_class_folders(args.root, skipped=[])  # fail before the (slow) model load; reported later
            if args.output is not None:
                check_output(args.output)
            if args.report is not None:
                check_output(Path(args.report) / REPORT_JSON, "--report", replaced=True)
            options = inference_options(args)
            model = model_from_args(args, ctx=ctx)
            if labels_file:
                summary = evaluate_multi_label(model, args.root, options, ctx=ctx)
            else:
                summary = evaluate(
                    model, args.root, options, ctx=ctx, ground_truth=args.ground_truth, report=args.report is not None
                )
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return exit_codes.USAGE
        if not ctx.is_main:
            # Success: a non-zero status would make torchrun stop rank 0 before it has written the summary.
            return exit_codes.OK
        summary["checkpoint"] = args.checkpoint
        report = summary.pop("report", None)
        text = json.dumps(summary, indent=2)
        print(text, flush=True)  # first: whatever happens to --output, the numbers are out
        problem = None
        if args.output:
            try:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(text + "\n", encoding="utf-8")
            except OSError as error:
                problem = (
                    f"error: writing {printable(args.output)} failed ({error.strerror or error}); "
                    "the summary is on stdout above"
                )
        if report is not None:
            try:
                written = write_report(report, args.report)
                print(f"report: {', '.join(printable(p) for p in written)}", file=sys.stderr)
            except OSError as error:
                problem = (problem + "\n" if problem else "") + (
                    f"error: writing the report to {printable(args.report)} failed ({error.strerror or error})"
                )
        if summary.get("multi_label"):
            mean_ap = "n/a" if summary["map"] is None else f"{summary['map']:.3f}%"
            f1 = "n/a" if summary["f1"] is None else f"{summary['f1']:.3f}%"
            scores = f"mAP {mean_ap}, macro F1 {f1}"
        else:
            top1 = "n/a" if summary["top1"] is None else f"{summary['top1']:.3f}%"
            top5 = "n/a" if summary["top5"] is None else f"{summary['top5']:.3f}%"
            scores = f"top-1 {top1}, top-5 {top5}"
        print(
            f"{summary['model']}: {scores} on {summary['evaluated']} images "
            f"({summary['failed']} unreadable), {summary['images_per_second']:.1f} img/s, {ctx.world_size} process(es)",
            file=sys.stderr,
        )
        for failure in summary["failures"]:
            print(f"{printable(failure['input'])}: ERROR {printable(failure['error'])}", file=sys.stderr)
        for entry in summary["skipped"]:
            print(f"warning: {Skipped(**entry)}", file=sys.stderr)
        if summary["skipped"]:
            print(
                f"warning: {len(summary['skipped'])} folder(s) could not be read: the numbers are of the "
                f"{summary['images']} images found, not of the whole dataset",
                file=sys.stderr,
            )
        if problem:
            print(problem, file=sys.stderr)
        bad = summary["failed"] or summary["skipped"] or problem
        return exit_codes.SOME_FAILED if bad else exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 on a folder of class folders (class names, or ImageNet WordNet ids); works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "root",
        help="folder with one sub-folder of images per class (its name, or WordNet id); with --ground-truth, a flat "
        "folder of images; for a multi-label model, a labels file (.csv: path,labels)",
    )
    add_model_options(parser)
    add_inference_options(parser, batch_size=64, top_k=False, per_process=True)
    add_progress_options(parser)
    parser.add_argument("--output", "-o", help="also write the JSON summary to this file (rank 0)")
    parser.add_argument(
        "--ground-truth",
        metavar="FILE",
        help="ROOT is a flat folder; FILE has one label per image, in file-name order: ILSVRC2012 class ids (the "
        "devkit's ILSVRC2012_validation_ground_truth.txt, with the devkit's meta.mat beside it), WordNet ids or "
        "class names",
    )
    parser.add_argument(
        "--report",
        metavar="DIR",
        help="also write per-class accuracy, the confusion matrix and calibration (ECE before/after temperature "
        "scaling) to DIR: report.json, confusion_matrix.png (rank 0)",
    )
    parser.set_defaults(func=run)
