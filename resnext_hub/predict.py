"""``predict``: top-k classes of many images (folders, list files, URLs) in 1 or N processes, resumably.

    python -m resnext_hub predict photos/ -o predictions.jsonl
    torchrun --nproc_per_node=8 -m resnext_hub predict --list images.txt -o predictions.csv

Each rank appends its results to its own file under ``<output>.parts/`` as it goes; at the end
rank 0 merges them into ``<output>`` in input order, one record per input. A re-run (with any
number of processes) skips the inputs already in ``<output>`` or in a part file left by an
interrupted run, so stopping and restarting loses nothing and repeats nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .distributed import DistContext, current_context, distributed, shard_batches, sigterm_as_exit
from .evaluate import (
    ImageListDataset,
    add_model_arguments,
    check_model_arguments,
    load_model,
    make_loader,
    prepare_inference,
    progress_bar,
    quiet_unless_main,
)
from .inference import expand_inputs

log = logging.getLogger(__name__)
EXIT_USAGE, EXIT_SOME_FAILED = 2, 1
FORMATS = ("jsonl", "csv")
_DECIMALS = 6  # probabilities are written rounded, so a CSV round trip gives the same text


# -- inputs -----------------------------------------------------------------------------------------


def read_list_file(path: str | Path) -> list[str]:
    """The image paths/URLs of a list file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"list file {path} could not be read: {error.strerror or error}") from error
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def collect_inputs(inputs: Sequence[str] = (), list_files: Sequence[str] = ()) -> list[str]:
    """Files, folders (recursive, sorted), URLs, then the entries of list files; each once, first place kept."""
    items = expand_inputs(list(inputs))
    for list_file in list_files:
        items += read_list_file(list_file)
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        log.info("%d repeated input(s) will be classified once", len(items) - len(unique))
    return unique


# -- records and files ------------------------------------------------------------------------------


def output_format(output: str | Path, fmt: str | None = None) -> str:
    """``fmt``, or the output's suffix: ``.csv`` is CSV, anything else JSON lines."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    return "csv" if Path(output).suffix.lower() == ".csv" else "jsonl"


def parts_dir(output: str | Path) -> Path:
    """Where the ranks write their partial results: ``<output>.parts/``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def _csv_header(k: int) -> list[str]:
    return ["input", "error"] + [
        f"{field}_{j}" for j in range(1, k + 1) for field in ("index", "wnid", "label", "probability")
    ]


def _to_row(record: dict[str, Any], k: int) -> list[Any]:
    if "error" in record:
        return [record["input"], record["error"]] + [""] * (4 * k)
    cells = zip(record["indices"], record["wnids"], record["labels"], record["probabilities"])
    return [record["input"], ""] + [value for top in cells for value in (*top[:3], f"{top[3]:.{_DECIMALS}f}")]


def _from_row(row: dict[str, str], k: int) -> dict[str, Any]:
    if row.get("error"):
        return {"input": row["input"], "error": row["error"]}
    return {
        "input": row["input"],
        "indices": [int(row[f"index_{j}"]) for j in range(1, k + 1)],
        "wnids": [row[f"wnid_{j}"] for j in range(1, k + 1)],
        "labels": [row[f"label_{j}"] for j in range(1, k + 1)],
        "probabilities": [float(row[f"probability_{j}"]) for j in range(1, k + 1)],
    }


def write_records(records: Iterable[dict[str, Any]], path: str | Path, fmt: str, k: int) -> None:
    """Write the merged output atomically: a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as out:
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(_csv_header(k))
            writer.writerows(_to_row(record, k) for record in records)
        else:
            out.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(temporary, path)


def read_records(path: str | Path, fmt: str) -> list[dict[str, Any]]:
    """The records of a merged output file written by :func:`write_records`."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if fmt == "csv":
                reader = csv.DictReader(handle)
                k = sum(1 for name in reader.fieldnames or [] if name.startswith("index_"))
                return [_from_row(row, k) for row in reader]
            return [json.loads(line) for line in handle if line.strip()]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} exists but is not a {fmt} file of predictions ({error}); pass another --output or remove it"
        ) from error


def read_part(path: Path) -> list[dict[str, Any]]:
    """A rank's JSON-lines part file; a line cut short by a killed process is dropped (and redone)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "input" in record:
                records.append(record)
    return records


def _check_top_k(records: Iterable[dict[str, Any]], k: int, where: Path) -> None:
    for record in records:
        if "indices" in record and len(record["indices"]) != k:
            raise ValueError(
                f"{where} holds top-{len(record['indices'])} results but --top-k is {k}: "
                "use the same --top-k to resume, or write to another --output"
            )


def load_done(output: Path, fmt: str, k: int) -> tuple[list[dict[str, Any]], list[Path]]:
    """Records already written (the merged output first, then leftover part files, oldest first)."""
    records = read_records(output, fmt) if output.exists() else []
    parts = sorted(parts_dir(output).glob("*.jsonl")) if parts_dir(output).is_dir() else []
    for part in parts:
        records += read_part(part)
    _check_top_k(records, k, output)
    return records, parts


# -- prediction -------------------------------------------------------------------------------------


def predict(
    model: torch.nn.Module,
    inputs: Sequence[str],
    output: str | Path,
    *,
    ctx: DistContext | None = None,
    fmt: str | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 4,
    exact: bool = False,
    compile: bool = False,
    progress: bool = False,
    retry_errors: bool = False,
) -> dict[str, Any]:
    """Classify ``inputs`` into ``output`` (JSON lines or CSV), skipping those already there.

    Every rank must pass the same ``inputs``. Returns a summary (the same on every rank);
    unreadable inputs get an ``error`` record instead of predictions. ``retry_errors`` tries
    those again. ``missing`` lists inputs without a result (a rank's part file that rank 0
    could not see); their part files are kept for a re-run.
    """
    ctx = ctx or current_context(next(model.parameters()).device)
    output, fmt = Path(output), output_format(output, fmt)
    k = min(top_k, model.num_classes)
    done_records, _ = load_done(output, fmt, k)
    done = {r["input"] for r in done_records if not (retry_errors and "error" in r)}
    ctx.barrier()  # every rank has read what is done before any rank adds to it

    batches = [
        [i for i in b if inputs[i] not in done]
        for b in shard_batches(len(inputs), batch_size, ctx.rank, ctx.world_size)
    ]
    batches = [b for b in batches if b]
    dataset = ImageListDataset(inputs, model.preprocessing)
    forward, precision = prepare_inference(model, ctx.device, exact=exact, compile=compile, ctx=ctx)
    classes = model.classes
    names = (classes.names, [classes.wnid(i) or "" for i in range(len(classes))])

    part_path = parts_dir(output) / f"{time.time_ns():020d}-rank{ctx.rank:05d}-{os.getpid()}.jsonl"
    processed, failures = 0, []
    started = time.perf_counter()
    bar = progress_bar(sum(len(b) for b in batches), progress and ctx.is_main)
    part = None
    try:
        for batch in make_loader(dataset, batches, workers, ctx.device):
            records = {i: {"input": inputs[i], "error": reason} for i, reason in batch.failed}
            failures += [(inputs[i], reason) for i, reason in batch.failed]
            if batch.images is not None:
                best = forward(batch.images).softmax(dim=1).cpu().topk(k, dim=1)
                for i, values, indices in zip(batch.indices, best.values.tolist(), best.indices.tolist()):
                    records[i] = {
                        "input": inputs[i],
                        "indices": indices,
                        "wnids": [names[1][j] for j in indices],
                        "labels": [names[0][j] for j in indices],
                        "probabilities": [round(v, _DECIMALS) for v in values],
                    }
            if part is None:
                part_path.parent.mkdir(parents=True, exist_ok=True)
                part = open(part_path, "a", encoding="utf-8")
            # One write and a flush per batch: a killed process leaves whole batches behind.
            part.write("".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
            part.flush()
            processed += len(records)
            if bar is not None:
                bar.update(len(records))
    finally:
        if part is not None:
            part.close()
        if bar is not None:
            bar.close()

    counts = ctx.all_reduce_sum(torch.tensor([processed], dtype=torch.float64))
    all_failures = [f for rank_failures in ctx.all_gather_object(failures) for f in rank_failures]
    summary = _merge(output, fmt, k, inputs) if ctx.is_main else None
    summary = ctx.all_gather_object(summary)[0]
    seconds = time.perf_counter() - started
    summary.update(
        processed=int(counts[0]),
        skipped=len(inputs) - int(counts[0]),
        seconds=seconds,
        images_per_second=int(counts[0]) / seconds if seconds > 0 else None,
        world_size=ctx.world_size,
        precision=precision,
        new_failures=[{"input": item, "error": reason} for item, reason in all_failures],
    )
    return summary


def _merge(output: Path, fmt: str, k: int, inputs: Sequence[str]) -> dict[str, Any]:
    """Rank 0: the old output plus every part file, one record per input in input order, atomically."""
    records, parts = load_done(output, fmt, k)
    by_input: dict[str, dict[str, Any]] = {}
    for record in records:  # oldest first: a retried input's newer record wins
        by_input[record["input"]] = record
    wanted = set(inputs)
    merged = [by_input[item] for item in inputs if item in by_input]
    merged += [record for item, record in by_input.items() if item not in wanted]  # never drop earlier results
    missing = [item for item in inputs if item not in by_input]
    write_records(merged, output, fmt, k)
    if not missing:  # else keep the parts: nothing is lost, and a re-run fills the gaps
        for part in parts:
            part.unlink()
        if parts_dir(output).is_dir() and not any(parts_dir(output).iterdir()):
            parts_dir(output).rmdir()
    failed = sum("error" in by_input[item] for item in inputs if item in by_input)
    return {
        "output": str(output),
        "format": fmt,
        "inputs": len(inputs),
        "classified": len(inputs) - len(missing) - failed,
        "failed": failed,
        "missing": missing,
    }


# -- command line -----------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    check_model_arguments(args)
    with sigterm_as_exit(), distributed(args.device) as ctx:
        quiet_unless_main(ctx)
        try:
            inputs = collect_inputs(args.inputs, args.list)
            if not inputs:
                raise ValueError(f"no images found in {args.inputs or args.list}")
            fmt = output_format(args.output, args.format)
            load_done(Path(args.output), fmt, args.top_k)  # a wrong --output or --top-k fails before the model loads
            model = load_model(args, ctx)
        except ValueError:
            if ctx.is_main:
                raise  # the CLI prints it once
            return EXIT_USAGE
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
            compile=args.compile,
            progress=bool(args.progress),
            retry_errors=args.retry_errors,
        )
        if not ctx.is_main:
            return 0  # rank 0 reports; a non-zero status here would make torchrun stop the others
        if summary["missing"]:  # only if a rank wrote where rank 0 cannot read
            print(
                f"error: {len(summary['missing'])} input(s) have no result (first: {summary['missing'][0]}); "
                f"re-run to complete them. On several nodes, {parts_dir(args.output)} must be on a shared file system",
                file=sys.stderr,
            )
            return EXIT_SOME_FAILED
        for failure in summary["new_failures"]:
            print(f"{failure['input']}: ERROR {failure['error']}", file=sys.stderr)
        print(
            f"{summary['inputs']} inputs: {summary['classified']} classified, {summary['failed']} unreadable; "
            f"{summary['processed']} done now ({summary['images_per_second'] or 0:.1f} img/s on "
            f"{ctx.world_size} process(es)), {summary['skipped']} done before; wrote {summary['output']}",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED if summary["failed"] else 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand."""
    parser = commands.add_parser(
        "predict",
        help="top-k of many images/URLs into JSON lines or CSV, resumable; works under torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or http(s) URLs")
    parser.add_argument("--list", "-l", action="append", default=[], help="a file of image paths/URLs, one per line")
    parser.add_argument("--output", "-o", required=True, help="the JSON-lines or CSV file to write (and resume)")
    parser.add_argument("--format", choices=FORMATS, help="default: csv for a .csv output, else jsonl")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--retry-errors", action="store_true", help="try again the inputs that failed before")
    add_model_arguments(parser)
    parser.set_defaults(func=cmd_predict)
