"""The per-input result and its one record, in every format: JSON lines, CSV, and text for the terminal.

The record is what ``classify --format json`` has always written, one per line::

    {"input": "cat.jpg", "predictions": [{"index": 281, "wnid": "n02123045", "label": "tabby", "probability": 0.51}]}
    {"input": "broken.jpg", "error": "not an image ..."}

CSV has one row per prediction (``input, rank, index, wnid, label, probability, error``) and one
row per error. Probabilities are rounded to 6 decimals, so a CSV round trip gives the same record.

Names: an input is written exactly as given, whatever it holds. File names on Linux are bytes; one
that is not UTF-8 reaches Python with surrogate escapes (``os.fsdecode(b"caf\\xe9.jpg")``). JSON lines
are ASCII: such characters, and control characters, are ``\\u`` escapes that ``json.loads`` reads
back to the same name. CSV files are UTF-8, written and read with ``errors="surrogateescape"``: an
undecodable byte is written as that byte, so the file holds the name as the file system does;
newlines and commas are quoted as CSV quotes them. Text (for people, and every message on the
terminal) shows each name on one line (:func:`printable`): control characters are escaped
(``\\n``, ``\\t``, ``\\u001b``), an undecodable byte is ``\\xNN``, a backslash is doubled, and a
URL's user name and password are replaced by ``***``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .processing import Prediction
from .processing.fetch import redact

Record = dict[str, Any]
DECIMALS = 6
CSV_HEADER = ("input", "rank", "index", "wnid", "label", "probability", "error")
_PREDICTION_KEYS = ("index", "wnid", "label", "probability")
# How files of records are encoded (see the module's docstring): names that are not UTF-8 keep their bytes.
ENCODING, ERRORS = "utf-8", "surrogateescape"
MAX_REASON_CHARS = 500
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, *, backslashes: bool = True, lines: bool = False) -> str:
    """``text`` safe on one line of a terminal or a text file (see the module's docstring); never raises.

    ``backslashes=False`` leaves backslashes alone: for a message that may quote names already escaped.
    ``lines=True`` keeps its newlines: a message of several lines, each made safe.
    """
    text = redact(str(text))
    if text.isprintable() and (not backslashes or "\\" not in text):
        return text
    shown = []
    for char in text:
        code = ord(char)
        if (char == "\\" and not backslashes) or (char == "\n" and lines):
            shown.append(char)
        elif char in _SHORT_ESCAPES:
            shown.append(_SHORT_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif not char.isprintable():
            shown.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            shown.append(char)
    return "".join(shown)


def failure_reason(error: BaseException) -> str:
    """Why an input failed, from an exception the loader did not expect: its type and message, bounded."""
    reason = f"{type(error).__name__}: {redact(str(error))}".rstrip(": ")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class Result:
    """The outcome for one input: its top-k, or the reason it could not be classified.

    ``input`` is the path or URL given (the encoded bytes, for images sent as such).
    """

    input: str | bytes
    predictions: list[Prediction] | None = None
    error: str | None = None

    def as_record(self) -> Record:
        """The shared record (see the module's docstring)."""
        if self.error is not None:
            return {"input": self.input, "error": self.error}
        predictions = [{**p._asdict(), "probability": round(p.probability, DECIMALS)} for p in self.predictions or []]
        return {"input": self.input, "predictions": predictions}


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


def csv_rows(record: Record) -> list[list[Any]]:
    """The CSV rows of one record (without the header)."""
    if "error" in record:
        return [[record["input"], "", "", "", "", "", record["error"]]]
    return [
        [record["input"], rank, p["index"], p["wnid"] or "", p["label"], f"{p['probability']:.{DECIMALS}f}", ""]
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
    return "\n".join(lines) + "\n"


class RecordWriter:
    """Records in one format (``text``, ``json`` or ``csv``) onto a text stream, each flushed as it comes.

    A flush per record: a reader (or a crash) sees whole records, and a stream that fails (a full disk)
    fails on the record being written, so the caller knows exactly which records reached it.
    """

    def __init__(self, fmt: str, out: TextIO) -> None:
        if fmt not in WRITERS:
            raise ValueError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
        self.fmt, self.out, self.started = fmt, out, False

    def text(self, record: Record) -> str:
        """The text of one record in this format (without the CSV header)."""
        if self.fmt == "json":
            return json_line(record)
        if self.fmt == "text":
            return text_lines(record)
        return _csv_text(csv_rows(record))

    def start(self) -> None:
        """Write what comes before the first record (the CSV header), if not yet written."""
        if self.fmt == "csv" and not self.started:
            self.out.write(_csv_text([CSV_HEADER]))
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


def write_csv(records: Iterable[Record], out: TextIO) -> None:
    """The header, then the rows of each record."""
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for record in records:
        writer.writerows(csv_rows(record))


def write_text(records: Iterable[Record], out: TextIO) -> None:
    """For people: the input, then one ranked line per class (or its error)."""
    for record in records:
        out.write(text_lines(record))


WRITERS = {"text": write_text, "json": write_jsonl, "csv": write_csv}


# -- output files -----------------------------------------------------------------------------------


def check_output(path: str | Path, what: str = "--output", *, replaced: bool = False) -> Path:
    """``path`` if a file can be written there, else ``ValueError`` saying why and what to do.

    Checked before any work, so a bad path costs nothing: not a folder, not below a file, the file
    (if it exists) writable, else a folder it can be created in (missing folders are created when it
    is written). ``replaced``: the file is replaced atomically (a new file beside it, renamed over it),
    so it must be a regular file and its folder writable.
    """
    text = str(path)
    path = Path(path)
    shown = printable(text)
    if not text:
        raise ValueError(f"{what} is empty: give a file name")
    if path.is_dir():
        raise ValueError(f"{what} {shown} is a folder: give the path of a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {shown}: {printable(folder)} is a file, not a folder")
    if path.exists():
        if replaced and not path.is_file():
            raise ValueError(f"{what} {shown} is not a regular file (it is replaced when written): give a file path")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{what} {shown} is not writable (permission denied): give another path")
    if (replaced or not path.exists()) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {shown}: no permission to create files in {printable(folder)}: give another path")
    return path


def open_output(path: str | Path) -> TextIO:
    """``path`` opened to write records (see the module's docstring for the encoding); folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", encoding=ENCODING, errors=ERRORS)


def write_output(
    records: Iterable[Record], fmt: str, path: str | Path | None, stdout: TextIO | None = None
) -> str | None:
    """Write ``records`` to ``path`` (None: ``stdout``), each as it comes; never lose one to the file.

    Should ``path`` fail (a full disk, a lost mount), the record being written and all after it go
    to ``stdout`` instead, in the same format. Returns None, or the message that says so (for stderr).
    """
    stdout = stdout or sys.stdout
    records = iter(records)
    if path is None:
        writer = RecordWriter(fmt, stdout)
        for record in records:
            writer.write(record)
        return None
    written, pending, problem = 0, None, None
    try:
        out = open_output(path)
    except OSError as error:
        out, problem = None, error
    if out is not None:
        writer = RecordWriter(fmt, out)
        try:
            writer.start()
        except OSError as error:
            problem = error
        for record in records if problem is None else ():  # only the writes' errors are the output's
            try:
                writer.write(record)
            except OSError as error:
                pending, problem = record, error
                break
            written += 1
        try:
            out.close()
        except OSError as error:  # a write the flushes did not report (e.g. on NFS)
            problem = problem or error
    if problem is None:
        return None
    fallback = RecordWriter(fmt, stdout)
    for record in _chain(pending, records):
        fallback.write(record)
    return (
        f"error: writing {printable(path)} failed ({problem.strerror or problem}) after {written} result(s); "
        "the results from there on are on stdout instead"
    )


def _chain(first: Record | None, rest: Iterator[Record]) -> Iterator[Record]:
    if first is not None:
        yield first
    yield from rest


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
    if tuple(reader.fieldnames or ()) != CSV_HEADER:
        raise ValueError(f"expected the columns {', '.join(CSV_HEADER)}, got {reader.fieldnames}")
    return list(_grouped(reader))


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
        elif current is None or current["input"] != row["input"]:
            raise ValueError(f"row of rank {row['rank']} for {row['input']!r} follows no rank 1")
        current["predictions"].append(prediction)
    if current is not None:
        yield current


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr counting images, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr)
