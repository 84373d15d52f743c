"""``predict``: top-k classes of many images (folders, list files, URLs) in 1 or N processes, resumably.

    python -m resnext_hub predict photos/ -o predictions.jsonl
    torchrun --nproc_per_node=8 -m resnext_hub predict --list images.txt -o predictions.csv

Each rank appends its results to its own file under ``<output>.parts/`` as it goes; at the end
rank 0 merges them into ``<output>`` in input order, one record per input. A re-run (with any
number of processes) skips the inputs already in ``<output>`` or in a part file left by an
interrupted run, so stopping and restarting loses nothing and repeats nothing. The records are
``classify --format json``'s (or its CSV rows).
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
    calibration_from_args,
    model_from_args,
    precision_from_args,
)
from ..data import collect_inputs
from ..distributed import distributed, quiet_unless_main, sigterm_as_exit
from ..predict import FORMATS, load_done, output_format, parts_dir, predict


def run(args: argparse.Namespace) -> int:
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            inputs = collect_inputs(args.inputs, args.list)
            if not inputs:
                raise ValueError(f"no images found in {args.inputs or args.list}")
            fmt = output_format(args.output, args.format)
            load_done(Path(args.output), fmt, args.top_k)  # a wrong --output or --top-k fails before the model loads
            model = model_from_args(args, ctx=ctx)
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return exit_codes.USAGE
        summary = predict(
            model,
            inputs,
            args.output,
            ctx=ctx,
            fmt=fmt,
            top_k=args.top_k,
            batch_size=args.batch_size,
            workers=args.workers,
            exact=args.exact,
            precision=precision_from_args(args),
            calibration=calibration_from_args(args),
            compile=args.compile,
            progress=bool(args.progress),
            retry_errors=args.retry_errors,
        )
        if not ctx.is_main:
            return exit_codes.OK  # rank 0 reports; a non-zero status here would make torchrun stop the others
        if summary["missing"]:  # only if a rank wrote where rank 0 cannot read
            print(
                f"error: {len(summary['missing'])} input(s) have no result (first: {summary['missing'][0]}); "
                f"re-run to complete them. On several nodes, {parts_dir(args.output)} must be on a shared file system",
                file=sys.stderr,
            )
            return exit_codes.SOME_FAILED
        for failure in summary["new_failures"]:
            print(f"{failure['input']}: ERROR {failure['error']}", file=sys.stderr)
        print(
            f"{summary['inputs']} inputs: {summary['classified']} classified, {summary['failed']} unreadable; "
            f"{summary['processed']} done now ({summary['images_per_second'] or 0:.1f} img/s on "
            f"{ctx.world_size} process(es)), {summary['skipped']} done before; wrote {summary['output']}",
            file=sys.stderr,
        )
        return exit_codes.SOME_FAILED if summary["failed"] else exit_codes.OK


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
