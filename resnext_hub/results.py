"""The per-input result and its one record, in every format: JSON lines, CSV, and text for the terminal.

The record is what ``classify --format json`` has always written, one per line::

    {"input": "cat.jpg", "predictions": [{"index": 281, "wnid": "n02123045", "label": "tabby", "probability": 0.51}]}
    {"input": "broken.jpg", "error": "not an image ..."}

CSV has one row per prediction (``input, rank, index, wnid, label, probability, error``) and one
row per error. Probabilities are rounded to 6 decimals, so a CSV round trip gives the same record.

A multi-label model's record (its sigmoid probability for every label, best first) adds ``labels``,
the names of the labels at or above their thresholds, in the model's label order::

    {"input": "beach.jpg", "predictions": [{"index": 1, "wnid": null, "label": "sea", "probability": 0.97}, ...],
     "labels": ["sea", "sky"]}

Its CSV has one more column, ``above_threshold`` (``1`` or ``0`` per prediction row: :data:`MULTI_LABEL_CSV_HEADER`).

Names: an input is written exactly as given, whatever it holds. File names on Linux are bytes; one
that is not UTF-8 reaches Python with surrogate escapes (``os.fsdecode(b"caf\\xe9.jpg")``). JSON lines
are ASCII: such characters, and control characters, are ``\\u`` escapes that ``json.loads`` reads
back to the same name. CSV files are UTF-8, written and read with ``errors="surrogateescape"``: an
undecodable byte is written as that byte, so the file holds the name as the file system does;
newlines and commas are quoted as CSV quotes them. Text (for people, and every message on the
terminal) shows each name on one line (:func:`resnext_hub.console.printable`).

Only records live here; files of records are written by :mod:`resnext_hub.outputs`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from .console import printable
from .processing import Prediction
from .processing.fetch import redact

Record = dict[str, Any]
DECIMALS = 6
CSV_HEADER = ("input", "rank", "index", "wnid", "label", "probability", "error")
MULTI_LABEL_CSV_HEADER = (*CSV_HEADER, "above_threshold")
_PREDICTION_KEYS = ("index", "wnid", "label", "probability")
# How files of records are encoded (see the module's docstring): names that are not UTF-8 keep their bytes.
ENCODING, ERRORS = "utf-8", "surrogateescape"
MAX_REASON_CHARS = 500


def failure_reason(error: BaseException) -> str:
    """Why an input failed, from an exception the loader did not expect: its type and message, bounded."""
    reason = f"{type(error).__name__}: {redact(str(error))}".rstrip(": ")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class Result:
    """The outcome for one input: its top-k, or the reason it could not be classified.

    ``input`` is the path or URL given (the encoded bytes, for images sent as such). ``labels``: a
    multi-label model's labels at or above their thresholds (None for a single-label model).
    """

    input: str | bytes
    predictions: list[Prediction] | None = None
    error: str | None = None
    labels: tuple[str, ...] | None = None

    def as_record(self) -> Record:
        """The shared record (see the module's docstring)."""
        if self.error is not None:
            return {"input": self.input, "error": self.error}
        predictions = [{**p._asdict(), "probability": round(p.probability, DECIMALS)} for p in self.predictions or []]
        record = {"input": self.input, "predictions": predictions}
        if self.labels is not None:
            record["labels"] = list(self.labels)
        return record


def check_record(record: Any) -> Record:
    """``record`` if it has the shared record's shape, else ``ValueError`` saying what is wrong."""
    if not isinstance(record, Mapping) or not isinstance(record.get("input"), str):
        raise ValueError(f"not a result record (no input): {record!r:.200}")
    if "error" in record:
        return dict(record)
    predictions = record.get("predictions")
    if not isinstance(predictions, list) or not all(
        isinstance(p, Mapping) and set(_PREDICTION_KEYS) <= set(p) for p in predictions
    ):
        raise ValueError(f"result record of {record['input']!r} has neither predictions nor an error")
    return dict(record)


# -- writing ----------------------------------------------------------------------------------------


def json_line(record: Record) -> str:
    """A record as one line of JSON lines (ASCII: any name is escaped, none breaks the line)."""
    return json.dumps(record) + "\n"


def csv_rows(record: Record, *, multi_label: bool = False) -> list[list[Any]]:
    """The CSV rows of one record (without the header); ``multi_label``: with the ``above_threshold`` column."""
    if "error" in record:
        return [[record["input"], "", "", "", "", "", record["error"], *([""] if multi_label else [])]]
    present = set(record.get("labels") or ())
    return [
        [
            record["input"],
            rank,
            p["index"],
            p["wnid"] or "",
            p["label"],
            f"{p['probability']:.{DECIMALS}f}",
            "",
            *([int(p["label"] in present)] if multi_label else []),
        ]
        for rank, p in enumerate(record["predictions"], 1)
    ]


def _csv_text(rows: Iterable[Iterable[Any]]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def text_lines(record: Record) -> str:
    """For people: the input, then one ranked line per class (or its error); names on one line each."""
    name = printable(record["input"])
    if "error" in record:
        return f"{name}: ERROR {printable(record['error'])}\n"
    lines = [name]
    for rank, p in enumerate(record["predictions"], 1):
        label = printable(p["label"])
        lines.append(f"  {rank}. {100 * p['probability']:5.1f}%  {label} ({p['wnid'] or p['index']})")
    if "labels" in record:
        lines.append(f"  labels: {', '.join(printable(name) for name in record['labels']) or '(none)'}")
    return "\n".join(lines) + "\n"


class RecordWriter:
    """Records in one format (``text``, ``json`` or ``csv``) onto a text stream, each flushed as it comes.

    A flush per record: a reader (or a crash) sees whole records, and a stream that fails (a full disk)
    fails on the record being written, so the caller knows exactly which records reached it.
    """

    def __init__(self, fmt: str, out: TextIO, *, multi_label: bool = False) -> None:
        if fmt not in WRITERS:
            raise ValueError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
        self.fmt, self.out, self.started, self.multi_label = fmt, out, False, multi_label

    def text(self, record: Record) -> str:
        """The text of one record in this format (without the CSV header)."""
        if self.fmt == "json":
            return json_line(record)
        if self.fmt == "text":
            return text_lines(record)
        return _csv_text(csv_rows(record, multi_label=self.multi_label))

    def start(self) -> None:
        """Write what comes before the first record (the CSV header), if not yet written."""
        if self.fmt == "csv" and not self.started:
            self.out.write(_csv_text([MULTI_LABEL_CSV_HEADER if self.multi_label else CSV_HEADER]))
            self.out.flush()
        self.started = True

    def write(self, record: Record) -> None:
        self.start()
        self.out.write(self.text(record))
        self.out.flush()


def write_jsonl(records: Iterable[Record], out: TextIO) -> None:
    """One JSON object per line, flushed: a stream, and a partial run is still readable."""
    for record in records:
        out.write(json_line(record))
        out.flush()


def write_csv(records: Iterable[Record], out: TextIO, *, multi_label: bool = False) -> None:
    """The header, then the rows of each record (``multi_label``: with the ``above_threshold`` column)."""
    writer = csv.writer(out)
    writer.writerow(MULTI_LABEL_CSV_HEADER if multi_label else CSV_HEADER)
    for record in records:
        writer.writerows(csv_rows(record, multi_label=multi_label))


def write_text(records: Iterable[Record], out: TextIO) -> None:
    """For people: the input, then one ranked line per class (or its error)."""
    for record in records:
        out.write(text_lines(record))


WRITERS = {"text": write_text, "json": write_jsonl, "csv": write_csv}


# -- reading ----------------------------------------------------------------------------------------


def read_jsonl(lines: Iterable[str], *, skip_bad: bool = False) -> list[Record]:
    """The records of JSON lines; ``skip_bad`` drops a line that is not one (cut short by a killed writer)."""
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(check_record(json.loads(line)))
        except ValueError:
            if not skip_bad:
                raise
    return records


def read_csv(handle: TextIO) -> list[Record]:
    """The records written by :func:`write_csv` (``ValueError`` for another file)."""
    reader = csv.DictReader(handle)
    if tuple(reader.fieldnames or ()) not in (CSV_HEADER, MULTI_LABEL_CSV_HEADER):
        raise ValueError(f"expected the columns {', '.join(CSV_HEADER)}[, above_threshold], got {reader.fieldnames}")
    return [_by_index(record) for record in _grouped(reader)]


def _grouped(rows: Iterable[dict[str, str]]) -> Iterator[Record]:
    current: Record | None = None
    for row in rows:
        if row["error"]:
            if current is not None:
                yield current
            current = None
            yield {"input": row["input"], "error": row["error"]}
            continue
        prediction = {
            "index": int(row["index"]),
            "wnid": row["wnid"] or None,
            "label": row["label"],
            "probability": float(row["probability"]),
        }
        if row["rank"] == "1":
            if current is not None:
                yield current
            current = {"input": row["input"], "predictions": []}
            if "above_threshold" in row:
                current["labels"] = []
        elif current is None or current["input"] != row["input"]:
            raise ValueError(f"row of rank {row['rank']} for {row['input']!r} follows no rank 1")
        current["predictions"].append(prediction)
        if row.get("above_threshold") == "1":
            current["labels"].append(prediction)
    if current is not None:
        yield current


def _by_index(record: Record) -> Record:
    """A multi-label record read from CSV: its labels as names in the model's label order, as written."""
    if "labels" in record:
        record["labels"] = [p["label"] for p in sorted(record["labels"], key=lambda p: p["index"])]
    return record
