"""Top-k classes of many inputs into one JSON-lines or CSV file, in 1 or N processes, resumably.

Each rank appends its results to its own file under ``<output>.parts/`` as it goes; at the end
rank 0 merges them into ``<output>`` in input order, one record per input. A re-run (with any
number of processes) skips the inputs already in ``<output>`` or in a part file left by an
interrupted run, so stopping and restarting loses nothing and repeats nothing. Records are the
shared result records of :mod:`resnext_hub.results`, in the output and in the part files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .distributed import DistContext, agreed_precision, current_context, shard_batches
from .engine import Engine
from .models import ResNet
from .results import Record, json_line, progress_bar, read_csv, read_jsonl, write_csv, write_jsonl

FORMATS = ("jsonl", "csv")


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


def write_records(records: Iterable[Record], path: str | Path, fmt: str) -> None:
    """Write the merged output atomically: a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as out:
        (write_csv if fmt == "csv" else write_jsonl)(records, out)
    os.replace(temporary, path)


def read_records(path: str | Path, fmt: str) -> list[Record]:
    """The records of a merged output file written by :func:`write_records`."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return read_csv(handle) if fmt == "csv" else read_jsonl(handle)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} exists but is not a {fmt} file of predictions ({error}); pass another --output or remove it"
        ) from error


def read_part(path: Path) -> list[Record]:
    """A rank's JSON-lines part file; a line cut short by a killed process is dropped (and redone)."""
    with open(path, encoding="utf-8") as handle:
        return read_jsonl(handle, skip_bad=True)


def _check_top_k(records: Iterable[Record], k: int, where: Path) -> None:
    for record in records:
        if "predictions" in record and len(record["predictions"]) != k:
            raise ValueError(
                f"{where} holds top-{len(record['predictions'])} results but --top-k is {k}: "
                "use the same --top-k to resume, or write to another --output"
            )


def load_done(output: Path, fmt: str, k: int) -> tuple[list[Record], list[Path]]:
    """Records already written (the merged output first, then leftover part files, oldest first)."""
    records = read_records(output, fmt) if output.exists() else []
    parts = sorted(parts_dir(output).glob("*.jsonl")) if parts_dir(output).is_dir() else []
    for part in parts:
        records += read_part(part)
    _check_top_k(records, k, output)
    return records, parts


def predict(
    model: ResNet,
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
    precision: str | None = None,
    calibration: Any = None,
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
    precision = precision or ("fp32" if exact else "auto")
    engine = Engine(model, device=ctx.device, precision=precision, compile=compile, calibration=calibration)
    precision = agreed_precision(ctx, engine.precision)

    part_path = parts_dir(output) / f"{time.time_ns():020d}-rank{ctx.rank:05d}-{os.getpid()}.jsonl"
    processed, failures = 0, []
    started = time.perf_counter()
    bar = progress_bar(sum(len(b) for b in batches), progress and ctx.is_main)
    part = None
    try:
        for results in engine.classify_batches(inputs, batches, k=k, workers=workers):
            failures += [(result.input, result.error) for _, result in results if result.error is not None]
            if part is None:
                part_path.parent.mkdir(parents=True, exist_ok=True)
                part = open(part_path, "a", encoding="utf-8")
            # One write and a flush per batch: a killed process leaves whole batches behind.
            part.write("".join(json_line(result.as_record()) for _, result in results))
            part.flush()
            processed += len(results)
            if bar is not None:
                bar.update(len(results))
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
    by_input: dict[str, Record] = {}
    for record in records:  # oldest first: a retried input's newer record wins
        by_input[record["input"]] = record
    wanted = set(inputs)
    merged = [by_input[item] for item in inputs if item in by_input]
    merged += [record for item, record in by_input.items() if item not in wanted]  # never drop earlier results
    missing = [item for item in inputs if item not in by_input]
    write_records(merged, output, fmt)
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
