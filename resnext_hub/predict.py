"""Top-k classes of many inputs into one JSON-lines or CSV file, in 1 or N processes, resumably.

Each rank appends its results to its own file under ``<output>.parts/`` as it goes; at the end
rank 0 merges them into ``<output>`` in input order, one record per input. A re-run (with any
number of processes) skips the inputs already in ``<output>`` or in a part file left by an
interrupted run, so stopping and restarting loses nothing and repeats nothing. Records are the
shared result records of :mod:`resnext_hub.results`, in the output and in the part files (names
that are not UTF-8 or hold control characters round-trip, in CSV too: see that module).

A resume continues the same job or nothing: ``<output>.job.json`` describes the job (model, weights
or checkpoint and its sha256, class count, top-k as clamped to it), and a run with another is
refused before anything is added. The job is opened once (:func:`open_job`: its paths checked, the
description, the output and the leftover part files read), by the command before the model loads or
by :func:`predict` itself. Should the merged output fail to be written, the part files are kept and a
re-run merges them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .console import printable, progress_bar
from .distributed import DistContext, agreed_precision, current_context, shard_batches
from .engine import Engine, clamp_top_k, resolve_device
from .models import ResNet
from .options import InferenceOptions
from .outputs import check_output
from .processing.atomic import open_atomic, write_atomic
from .results import ENCODING, ERRORS, Record, json_line, read_csv, read_jsonl, write_csv, write_jsonl

FORMATS = ("jsonl", "csv")
JOB_KEYS = ("model", "weights", "checkpoint", "checkpoint_sha256", "num_classes", "top_k")


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


def job_path(output: str | Path) -> Path:
    """Where the job writing ``output`` is described: ``<output>.job.json``."""
    output = Path(output)
    return output.with_name(output.name + ".job.json")


def check_paths(output: str | Path) -> Path:
    """``ValueError`` unless ``output``, its part files and its job description can all be written."""
    output = check_output(output, replaced=True)
    parts = parts_dir(output)
    if parts.exists() and not parts.is_dir():
        raise ValueError(f"{printable(parts)} (for part files) is not a folder: remove it or pass another --output")
    if parts.is_dir() and not os.access(parts, os.W_OK | os.X_OK):
        raise ValueError(f"no permission to write part files in {printable(parts)}: pass another --output")
    if job_path(output).exists():
        check_output(job_path(output), "the job description", replaced=True)
    return output


def describe_job(
    *,
    model: str | None,
    weights: str | None,
    num_classes: int | None,
    top_k: int,
    multi_label: bool = False,
    **provenance: Any,
) -> dict[str, Any]:
    """What identifies a job: the model, its weights (a published name, or a checkpoint and its sha256),
    and the top-k it writes, as clamped to the class count (a multi-label model's: every label, and the
    description says ``multi_label``). ``num_classes`` None: not known yet (a checkpoint's, before it
    loads); ``top_k`` is then as asked."""
    k = top_k if num_classes is None else clamp_top_k(top_k, num_classes)
    if multi_label and num_classes is not None:
        k = num_classes
    job = {"model": model, "weights": weights, "num_classes": num_classes, "top_k": k}
    if multi_label:
        job["multi_label"] = True
    job.update({key: value for key, value in provenance.items() if key in JOB_KEYS})
    return job


def _describe(job: Mapping[str, Any]) -> str:
    weights = job.get("weights") or "random or local weights"
    if job.get("checkpoint"):
        sha = job.get("checkpoint_sha256")
        weights = f"checkpoint {printable(job['checkpoint'])}" + (f" (sha256 {sha[:12]}…)" if sha else "")
    return f"model {job.get('model')}, {weights}, top-{job.get('top_k')}"


def read_job(output: str | Path) -> dict[str, Any] | None:
    """The job description beside ``output``, or None."""
    path = job_path(output)
    if not path.exists():
        return None
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{printable(path)} is not a job description ({error}): remove it to resume") from error
    if not isinstance(job, dict):
        raise ValueError(f"{printable(path)} is not a job description: remove it to resume")
    return job


@dataclass
class PredictJob:
    """A ``predict`` output being written or resumed, as :func:`open_job` found it (its files read once)."""

    output: Path
    fmt: str
    started: bool  # the output or a part file exists: a resume
    stored: dict[str, Any] | None  # <output>.job.json, where the job was started with one
    done: list[Record]  # records already written: the output's, then the leftover part files' (oldest first)
    parts: list[Path]  # those part files
    checked: dict[str, Any] | None = None  # the description last checked (:meth:`check`)

    def check(self, job: Mapping[str, Any]) -> None:
        """``ValueError`` if the output holds results of another job than ``job`` (:func:`describe_job`'s):
        another top-k in its records, or another description beside it. Checked in memory; once per description."""
        if job == self.checked or not self.started:
            self.checked = dict(job)
            return
        stored, job = self.stored or {}, dict(job)
        if job.get("num_classes") is None and stored.get("num_classes"):  # the class count is the stored job's
            count = stored["num_classes"]
            k = count if stored.get("multi_label") else clamp_top_k(job["top_k"], count)
            job.update(num_classes=count, top_k=k)
        if job.get("num_classes") is not None:  # else the top-k is known once the model has loaded
            _check_top_k(self.done, job["top_k"], self.output)
        differ = [key for key in JOB_KEYS if key in stored and key in job and stored[key] != job[key]]
        if differ:
            raise ValueError(
                f"{printable(self.output)} holds results of {_describe(stored)}; this run is {_describe(job)} "
                f"(differs in {', '.join(differ)}): resume with the same --model, --weights/--checkpoint and "
                "--top-k, or write to another --output"
            )
        self.checked = dict(job)

    def write_description(self, job: Mapping[str, Any]) -> None:
        """Describe the job beside the output (atomically), unless a resumed job's description is there."""
        if not (self.started and self.stored is not None):
            write_atomic(job_path(self.output), json.dumps(dict(job), indent=2) + "\n")

    def new_parts(self) -> list[Path]:
        """Part files written since the job was opened (by any rank), oldest first."""
        folder, known = parts_dir(self.output), set(self.parts)
        return sorted(p for p in folder.glob("*.jsonl") if p not in known) if folder.is_dir() else []


def open_job(output: str | Path, fmt: str | None = None) -> PredictJob:
    """The job writing ``output``, opened once: its paths checked (:func:`check_paths`), its description and
    what is done (the output, then leftover part files) read. ``fmt``: see :func:`output_format`."""
    output = check_paths(output)
    fmt = output_format(output, fmt)
    done = read_records(output, fmt) if output.exists() else []
    parts = sorted(parts_dir(output).glob("*.jsonl")) if parts_dir(output).is_dir() else []
    for part in parts:
        done += read_part(part)
    started = output.exists() or bool(parts)
    return PredictJob(output, fmt, started, read_job(output) if started else None, done, parts)


def write_records(records: Iterable[Record], path: str | Path, fmt: str) -> None:
    """Write the merged output atomically: a reader never sees half a file, a failure leaves the old one."""
    records = list(records)
    with open_atomic(path, "w", newline="", encoding=ENCODING, errors=ERRORS) as out:
        if fmt == "csv":  # a multi-label model's records name their labels above threshold
            write_csv(records, out, multi_label=any("labels" in record for record in records))
        else:
            write_jsonl(records, out)


def read_records(path: str | Path, fmt: str) -> list[Record]:
    """The records of a merged output file written by :func:`write_records`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{printable(path)} is not a regular file: pass another --output")
    try:
        with open(path, newline="", encoding=ENCODING, errors=ERRORS) as handle:
            return read_csv(handle) if fmt == "csv" else read_jsonl(handle)
    except OSError as error:
        raise ValueError(f"{printable(path)} could not be read: {error.strerror or error}") from error
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{printable(path)} exists but is not a {fmt} file of predictions ({error}); pass another --output "
            "or remove it"
        ) from error


def read_part(path: Path) -> list[Record]:
    """A rank's JSON-lines part file; a line cut short by a killed process is dropped (and redone)."""
    with open(path, encoding=ENCODING, errors=ERRORS) as handle:
        return read_jsonl(handle, skip_bad=True)


def _check_top_k(records: Iterable[Record], k: int, where: Path) -> None:
    for record in records:
        if "predictions" in record and len(record["predictions"]) != k:
            raise ValueError(
                f"{printable(where)} holds top-{len(record['predictions'])} results but --top-k is {k}: "
                "use the same --top-k to resume, or write to another --output"
            )


def predict(
    model: ResNet,
    inputs: Sequence[str],
    output: str | Path | PredictJob,
    options: InferenceOptions | None = None,
    *,
    ctx: DistContext | None = None,
    fmt: str | None = None,
    retry_errors: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Classify ``inputs`` into ``output`` (JSON lines or CSV) as ``options`` say, skipping those already there.

    ``output``: the file, or the job the caller opened on it (:func:`open_job`; ``fmt`` is then its).
    Every rank must pass the same ``inputs``. Returns a summary (the same on every rank);
    unreadable inputs get an ``error`` record instead of predictions. ``retry_errors`` tries
    those again. ``missing`` lists inputs without a result (a rank's part file that rank 0
    could not see); their part files are kept for a re-run. ``write_error`` says why the merged
    output could not be written (its part files are then kept too). ``provenance``: what else
    identifies the weights (``checkpoint``, ``checkpoint_sha256``) in the job description; a
    resume with another job is refused (``ValueError``, see :meth:`PredictJob.check`).
    """
    options = options or InferenceOptions()
    ctx = ctx or current_context(resolve_device(options.device))
    job = output if isinstance(output, PredictJob) else open_job(output, fmt)
    record = model.weights_record
    description = describe_job(
        model=model.architecture,
        weights=record.name if record is not None else None,
        num_classes=model.num_classes,
        top_k=options.top_k,
        multi_label=model.multi_label,  # every label's probability
        **(provenance or {}),
    )
    job.check(description)
    k = description["top_k"]
    done = {r["input"] for r in job.done if not (retry_errors and "error" in r)}
    if ctx.is_main:
        job.write_description(description)
    ctx.barrier()  # every rank has read what is done before any rank adds to it

    batches = [
        [i for i in b if inputs[i] not in done]
        for b in shard_batches(len(inputs), options.batch_size, ctx.rank, ctx.world_size)
    ]
    batches = [b for b in batches if b]
    engine = Engine(model, dataclasses.replace(options, device=ctx.device))
    precision = agreed_precision(ctx, engine.precision)

    part_path = parts_dir(job.output) / f"{time.time_ns():020d}-rank{ctx.rank:05d}-{os.getpid()}.jsonl"
    processed, failures = 0, []
    started = time.perf_counter()
    bar = progress_bar(sum(len(b) for b in batches), options.progress and ctx.is_main)
    part = None
    try:
        for results in engine.classify_batches(inputs, batches, k=k):
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
    summary = _merge(job, inputs) if ctx.is_main else None
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


def _merge(job: PredictJob, inputs: Sequence[str]) -> dict[str, Any]:
    """Rank 0: what was done before plus every new part file, one record per input in input order, atomically."""
    output, fmt, new_parts = job.output, job.fmt, job.new_parts()
    records = job.done + [record for part in new_parts for record in read_part(part)]
    parts = job.parts + new_parts
    by_input: dict[str, Record] = {}
    for record in records:  # oldest first: a retried input's newer record wins
        by_input[record["input"]] = record
    wanted = set(inputs)
    merged = [by_input[item] for item in inputs if item in by_input]
    merged += [record for item, record in by_input.items() if item not in wanted]  # never drop earlier results
    missing = [item for item in inputs if item not in by_input]
    try:
        write_records(merged, output, fmt)
        write_error = None
    except OSError as error:  # keep the parts: a re-run merges them
        write_error = error.strerror or str(error)
    if not missing and write_error is None:  # else keep the parts: nothing is lost, and a re-run fills the gaps
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
        "write_error": write_error,
    }
