"""``classify``: the top-k classes of image files, folders and URLs, as text, JSON lines or CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
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
from ..data import expand_inputs
from ..engine import Engine
from ..processing.images import is_url
from ..results import WRITERS, Record, progress_bar


def run(args: argparse.Namespace) -> int:
    inputs = expand_inputs(args.inputs)
    if not inputs:
        print(f"error: no images found in {args.inputs}", file=sys.stderr)
        return exit_codes.USAGE
    missing = [item for item in inputs if not is_url(item) and not Path(item).exists()]
    if len(missing) == len(inputs):
        # Nothing to classify: say so before loading (maybe downloading) a model.
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return exit_codes.USAGE
    engine = Engine(
        model_from_args(args),
        device=args.device,
        precision=precision_from_args(args),
        calibration=calibration_from_args(args),
    )
    bar = progress_bar(len(inputs), args.progress)
    failed = 0

    def records() -> Iterator[Record]:
        nonlocal failed
        for result in engine.classify(inputs, batch_size=args.batch_size, k=args.top_k):
            failed += result.error is not None
            if bar is not None:
                bar.update(1)
            yield result.as_record()

    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        WRITERS[args.format](records(), out)
    finally:
        if bar is not None:
            bar.close()
        if args.output:
            out.close()
    if failed:
        print(f"{failed} of {len(inputs)} inputs could not be classified", file=sys.stderr)
    return exit_codes.SOME_FAILED if failed else exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``classify`` subcommand."""
    parser = subparsers.add_parser("classify", help="classify image files, folders and URLs", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or http(s) URLs")
    add_model_options(parser)
    add_inference_options(parser, batch_size=16, no_amp=True)
    parser.add_argument("--format", choices=sorted(WRITERS), default="text", help="json writes one object per line")
    parser.add_argument("--output", "-o", help="write results to this file instead of stdout")
    add_progress_options(parser)
    parser.set_defaults(func=run)
