"""``predict``: top-k classes of many images (folders, list files, URLs) in 1 or N processes, resumably.

    python -m resnext_hub predict photos/ -o predictions.jsonl
    torchrun --nproc_per_node=8 -m resnext_hub predict --list images.txt -o predictions.csv

Each rank appends its results to its own file under ``<output>.parts/`` as it goes; at the end
rank 0 merges them into ``<output>`` in input order, one record per input. A re-run (with any
number of processes) skips the inputs already in ``<output>`` or in a part file left by an
interrupted run, so stopping and restarting loses nothing and repeats nothing. The records are
``classify --format json``'s (or its CSV rows).

A re-run must be the same job: the same --model, --weights/--checkpoint and --top-k (above the
class count: all classes), as ``<output>.job.json`` records; another is refused before the model
loads. Exit status: 0; 1 when an input failed, a folder could not be read or the output could not
be written (the results are then kept in the part files: re-run to merge them); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import exit_codes
from ..arguments import (
    add_inference_options,
    add_model_options,
    add_progress_options,
    inference_options,
    model_from_args,
    report_skipped,
)
from ..console import printable
from ..data import Skipped, collect_inputs
from ..distributed import distributed, quiet_unless_main, sigterm_as_exit
from ..models.download import sha256_of
from ..models.openvino_ir import openvino_ir_path
from ..models.registry import architecture_of
from ..models.weights import get_weights
from ..predict import FORMATS, describe_job, open_job, parts_dir, predict


def _provenance(args: argparse.Namespace) -> dict:
    """Where the weights come from, beyond the published name: the checkpoint file and its sha256."""
    if not args.checkpoint:
        return {}
    path = Path(args.checkpoint).expanduser()
    ir = openvino_ir_path(path)  # a saved OpenVINO IR: its weights file
    try:
        sha = sha256_of(ir.with_suffix(".bin") if ir else path)
    except OSError:
        sha = None  # the model load says what is wrong with it
    return {"checkpoint": str(path.resolve()), "checkpoint_sha256": sha}


def _job(args: argparse.Namespace, provenance: dict) -> dict:
    """The job this run continues or starts, from the options alone (before the model loads): a checkpoint's
    class count is known once it has loaded."""
    architecture = architecture_of(args.model)
    record = get_weights(architecture, args.weights)
    weights, num_classes = (None, None) if args.checkpoint else (record.name, record.num_classes)
    return describe_job(model=architecture, weights=weights, num_classes=num_classes, top_k=args.top_k, **provenance)


def run(args: argparse.Namespace) -> int:
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        skipped: list[Skipped] = []
        try:
            inputs = collect_inputs(args.inputs, args.list, skipped)
            if ctx.is_main:
                report_skipped(skipped)
            if not inputs:
                shown = ", ".join(printable(item) for item in args.inputs + args.list)
                raise ValueError(f"no images found in {shown}")
            # Before the model loads: a wrong --output, another job's output or another --top-k fails now.
            job = open_job(args.output, args.format)
            provenance = _provenance(args)
            job.check(_job(args, provenance))
            options = inference_options(args)
            model = model_from_args(args, ctx=ctx)
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return exit_codes.USAGE
        try:
            summary = predict(
                model, inputs, job, options, ctx=ctx, retry_errors=args.retry_errors, provenance=provenance
            )
        except OSError as error:  # a part file could not be written (a full disk): what was written is kept
            print(
                f"error: writing results under {printable(parts_dir(args.output))} failed "
                f"({error.strerror or error}); those written are kept: re-run to continue",
                file=sys.stderr,
            )
            return exit_codes.SOME_FAILED
        if not ctx.is_main:
            return exit_codes.OK  # rank 0 reports; a non-zero status here would make torchrun stop the others
        if summary["missing"]:  # only if a rank wrote where rank 0 cannot read
            print(
                f"error: {len(summary['missing'])} input(s) have no result (first: "
                f"{printable(summary['missing'][0])}); re-run to complete them. On several nodes, "
                f"{printable(parts_dir(args.output))} must be on a shared file system",
                file=sys.stderr,
            )
            return exit_codes.SOME_FAILED
        for failure in summary["new_failures"]:
            print(f"{printable(failure['input'])}: ERROR {printable(failure['error'])}", file=sys.stderr)
        if summary["write_error"]:
            print(
                f"error: writing {printable(summary['output'])} failed ({summary['write_error']}); the results are "
                f"kept in {printable(parts_dir(args.output))}: re-run the same command to merge them",
                file=sys.stderr,
            )
            return exit_codes.SOME_FAILED
        print(
            f"{summary['inputs']} inputs: {summary['classified']} classified, {summary['failed']} unreadable; "
            f"{summary['processed']} done now ({summary['images_per_second'] or 0:.1f} img/s on "
            f"{ctx.world_size} process(es) in {summary['precision']}), {summary['skipped']} done before; "
            f"wrote {printable(summary['output'])}",
            file=sys.stderr,
        )
        if skipped:
            print(f"warning: {len(skipped)} folder(s) could not be read: their images were skipped", file=sys.stderr)
        return exit_codes.SOME_FAILED if summary["failed"] or skipped else exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="top-k of many images/URLs into JSON lines or CSV, resumable; works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or http(s) URLs")
    parser.add_argument("--list", "-l", action="append", default=[], help="a file of image paths/URLs, one per line")
    parser.add_argument("--output", "-o", required=True, help="the JSON-lines or CSV file to write (and resume)")
    parser.add_argument("--format", choices=FORMATS, help="default: csv for a .csv output, else jsonl")
    parser.add_argument("--retry-errors", action="store_true", help="try again the inputs that failed before")
    add_model_options(parser)
    add_inference_options(parser, batch_size=64, per_process=True)
    add_progress_options(parser)
    parser.set_defaults(func=run)
