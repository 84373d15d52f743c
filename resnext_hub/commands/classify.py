"""``classify``: the top-k classes of image files, folders and URLs, as text, JSON lines or CSV.

Every input gets one record, in input order: its top-k, or why it failed. ``--top-k`` above the
model's class count gives all its classes. ``--explain DIR`` also writes, per input, a PNG of its photo
with the top-1 class's explanation map blended over the part the model saw (named after the input,
``cat.jpg`` -> ``DIR/cat.png``; a name taken by an earlier input gets ``-2``, ...; written atomically).
``-o`` and ``DIR`` are checked before the model loads; should ``-o`` fail while being written (a full
disk), the remaining results go to stdout and stderr says so. Exit status: 0, or 1 when an input
failed, a folder could not be read or an output failed; 2 for usage errors (nothing done).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
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
from ..console import printable, progress_bar
from ..data import Skipped, expand_inputs
from ..engine import Engine
from ..outputs import check_folder, check_output, picture_names, write_output, write_picture, write_problem
from ..processing.images import is_url
from ..results import WRITERS, Record


def _check_not_an_input(output: str, inputs: list[str]) -> None:
    """``ValueError`` if writing ``output`` would overwrite one of the inputs before it is read."""
    if not Path(output).is_file():
        return
    for item in inputs:
        try:
            same = not is_url(item) and os.path.samefile(item, output)
        except (OSError, ValueError):
            continue
        if same:
            raise ValueError(f"--output {printable(output)} is one of the inputs: writing it would destroy it")


def run(args: argparse.Namespace) -> int:
    skipped: list[Skipped] = []
    inputs = expand_inputs(args.inputs, skipped)
    report_skipped(skipped)
    if not inputs:
        shown = ", ".join(printable(item) for item in args.inputs)
        print(f"error: no images found in {shown}", file=sys.stderr)
        return exit_codes.USAGE
    missing = [item for item in inputs if not is_url(item) and not Path(item).exists()]
    if len(missing) == len(inputs):
        # Nothing to classify: say so before loading (maybe downloading) a model.
        print(f"error: no such file: {', '.join(printable(item) for item in missing)}", file=sys.stderr)
        return exit_codes.USAGE
    if args.output is not None:
        check_output(args.output)  # before the model loads: a ValueError is a usage error
        _check_not_an_input(args.output, inputs)
    if args.explain is not None:
        check_folder(args.explain, "--explain")
    options = inference_options(args)
    engine = Engine(model_from_args(args), options)
    if args.explain is not None:
        engine.check_explainable()  # an int8 copy or another head: a usage error before any input is read
    bar = progress_bar(len(inputs), options.progress)
    failed = 0
    unwritten: list[str] = []

    def results() -> Iterator:
        if args.explain is None:
            yield from engine.classify(inputs)
            return
        names = iter(picture_names(inputs))
        for result, picture in engine.explain_items(inputs):
            path = Path(args.explain) / next(names)
            if picture is not None:
                try:
                    write_picture(path, picture)
                except OSError as error:
                    unwritten.append(write_problem(error, path) or f"writing {printable(path)} failed: {error}")
            yield result

    def records() -> Iterator[Record]:
        nonlocal failed
        for result in results():
            failed += result.error is not None
            if bar is not None:
                bar.update(1)
            yield result.as_record()

    try:
        problem = write_output(records(), args.format, args.output, multi_label=engine.multi_label)
    finally:
        if bar is not None:
            bar.close()
    if problem:
        print(problem, file=sys.stderr)
    for message in unwritten:
        print(f"error: {message}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} inputs could not be classified", file=sys.stderr)
    return exit_codes.SOME_FAILED if failed or skipped or problem or unwritten else exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``classify`` subcommand."""
    parser = subparsers.add_parser(
        "classify",
        help="classify image files, folders and URLs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or http(s) URLs")
    add_model_options(parser)
    add_inference_options(parser, batch_size=16, aliases=("--exact", "--no-amp"))
    parser.add_argument("--format", choices=sorted(WRITERS), default="text", help="json writes one object per line")
    parser.add_argument("--output", "-o", help="write results to this file instead of stdout")
    parser.add_argument(
        "--explain",
        metavar="DIR",
        help="also write one PNG per input into DIR: the photo with its top-1 class's explanation map (CAM) over it",
    )
    add_progress_options(parser)
    parser.set_defaults(func=run)
