"""Command line: ``python -m resnext_hub <command>`` from the repo root."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from .arguments import add_model_options, add_progress_options, model_from_args
from .inference import Classifier, Result, expand_inputs
from .models import WeightsUnavailableError, load_manifest
from .models.checkpoint import CheckpointError
from .processing.images import is_url

EXIT_USAGE, EXIT_SOME_FAILED = 2, 1
# Modules of this package that add a subcommand: each has ``register(commands)``.
COMMAND_MODULES: tuple[str, ...] = ("evaluate", "predict", "export", "serve")


def _progress(results: Iterable[Result], total: int, enabled: bool) -> Iterable[Result]:
    if not enabled:
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, unit="img", file=sys.stderr)


def _write_text(results: Iterable[Result], out: TextIO) -> None:
    for result in results:
        if result.error:
            print(f"{result.input}: ERROR {result.error}", file=out)
            continue
        print(result.input, file=out)
        for rank, p in enumerate(result.predictions or [], 1):
            print(f"  {rank}. {100 * p.probability:5.1f}%  {p.label} ({p.wnid or p.index})", file=out)


def _record(result: Result) -> dict:
    if result.error:
        return {"input": result.input, "error": result.error}
    return {"input": result.input, "predictions": [p._asdict() for p in result.predictions or []]}


def _write_json(results: Iterable[Result], out: TextIO) -> None:
    # One JSON object per line: streams, and a partial run is still readable.
    for result in results:
        print(json.dumps(_record(result)), file=out, flush=True)


def _write_csv(results: Iterable[Result], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(["input", "rank", "index", "wnid", "label", "probability", "error"])
    for result in results:
        if result.error:
            writer.writerow([result.input, "", "", "", "", "", result.error])
        for rank, p in enumerate(result.predictions or [], 1):
            writer.writerow([result.input, rank, p.index, p.wnid, p.label, f"{p.probability:.6f}", ""])


WRITERS = {"text": _write_text, "json": _write_json, "csv": _write_csv}


def cmd_classify(args: argparse.Namespace) -> int:
    inputs = expand_inputs(args.inputs)
    if not inputs:
        print(f"error: no images found in {args.inputs}", file=sys.stderr)
        return EXIT_USAGE
    missing = [item for item in inputs if not is_url(item) and not Path(item).exists()]
    if len(missing) == len(inputs):
        # Nothing to classify: say so before loading (maybe downloading) a model.
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    classifier = Classifier(
        model_from_args(args),
        device=args.device,
        amp=not args.no_amp,
        exact=args.exact,
    )
    failed = 0

    def counted(results: Iterable[Result]) -> Iterable[Result]:
        nonlocal failed
        for result in results:
            failed += result.error is not None
            yield result

    results = classifier.classify(inputs, batch_size=args.batch_size, k=args.top_k)
    results = _progress(counted(results), len(inputs), args.progress)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        WRITERS[args.format](results, out)
    finally:
        if args.output:
            out.close()
    if failed:
        print(f"{failed} of {len(inputs)} inputs could not be classified", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    for record in load_manifest().values():
        top1 = record.accuracy.get("top1")
        print(f"{record.name:36} {record.num_params:>11,} params  top-1 {top1}%  {record.file_name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resnext_hub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify image files, folders and URLs")
    classify.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or http(s) URLs")
    add_model_options(classify)
    classify.add_argument("--batch-size", type=int, default=16)
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--format", choices=sorted(WRITERS), default="text", help="json writes one object per line")
    classify.add_argument("--output", "-o", help="write results to this file instead of stdout")
    classify.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    classify.add_argument("--no-amp", action="store_true", help="on CUDA, run in fp32 instead of fp16")
    classify.add_argument(
        "--exact", action="store_true", help="exact fp32 (default: the fastest faithful precision, e.g. bf16 on CPU)"
    )
    add_progress_options(classify)
    classify.set_defaults(func=cmd_classify)

    listing = commands.add_parser("models", help="list the served models and their weights")
    listing.set_defaults(func=cmd_models)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "top_k", 1) < 1:
        parser.error("--batch-size and --top-k must be at least 1")
    if getattr(args, "progress", False) is None:
        args.progress = sys.stderr.isatty()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (WeightsUnavailableError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
