"""The shared result record: classify's JSON line, its CSV rows and text, and reading them back."""

from __future__ import annotations

import io
import json
import os

import pytest

from resnext_hub.console import printable
from resnext_hub.predict import read_records, write_records
from resnext_hub.processing import Prediction
from resnext_hub.results import (
    Result,
    failure_reason,
    read_csv,
    read_jsonl,
    write_csv,
    write_jsonl,
    write_text,
)

RESULTS = [
    Result("a, b.jpg", predictions=[Prediction(3, "n1", 'x, "y"', 0.5123456789), Prediction(1, None, "z", 0.25)]),
    Result("bad.jpg", error="not an image"),
    Result("a, b.jpg", predictions=[Prediction(7, "n7", "w", 0.9), Prediction(2, "n2", "v", 0.05)]),  # again
]


def test_the_record_is_classify_s_json_line_with_rounded_probabilities():
    record = RESULTS[0].as_record()
    assert record == {
        "input": "a, b.jpg",
        "predictions": [
            {"index": 3, "wnid": "n1", "label": 'x, "y"', "probability": 0.512346},
            {"index": 1, "wnid": None, "label": "z", "probability": 0.25},
        ],
    }
    assert RESULTS[1].as_record() == {"input": "bad.jpg", "error": "not an image"}


def test_json_lines_and_csv_round_trip_to_the_same_records():
    records = [result.as_record() for result in RESULTS]
    lines, table = io.StringIO(), io.StringIO()
    write_jsonl(records, lines)
    write_csv(records, table)
    assert read_jsonl(lines.getvalue().splitlines()) == records
    assert read_csv(io.StringIO(table.getvalue())) == records
    assert table.getvalue().splitlines()[0] == "input,rank,index,wnid,label,probability,error"


def test_reading_refuses_other_layouts_and_skips_cut_lines_only_when_asked():
    with pytest.raises(ValueError, match="expected the columns"):
        read_csv(io.StringIO("input,error,index_1,wnid_1,label_1,probability_1\na.jpg,,1,n1,x,0.5\n"))
    good = json.dumps(RESULTS[1].as_record())
    with pytest.raises(ValueError):
        read_jsonl([good, good[:10]])
    assert read_jsonl([good, good[:10], json.dumps({"input": "x"})], skip_bad=True) == [RESULTS[1].as_record()]


def test_text_for_the_terminal():
    out = io.StringIO()
    write_text([result.as_record() for result in RESULTS[:2]], out)
    assert out.getvalue().splitlines() == [
        "a, b.jpg",
        '  1.  51.2%  x, "y" (n1)',
        "  2.  25.0%  z (1)",
        "bad.jpg: ERROR not an image",
    ]


# -- names and text (issue 13) ------------------------------------------------------

UNDECODABLE = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on Linux: not UTF-8
AWKWARD = [UNDECODABLE, "new\nline.jpg", "tab\tand\x1b[31mred.jpg", "back\\slash.jpg", "rtl\u202egpj.exe", "é.jpg"]


def test_text_puts_every_name_on_one_line_and_escapes_what_would_forge_or_hide_lines():
    records = [{"input": name, "error": "bad\nline"} for name in AWKWARD]
    out = io.StringIO()
    write_text(records, out)
    lines = out.getvalue().splitlines()
    assert lines == [
        "caf\\xe9.jpg: ERROR bad\\nline",
        "new\\nline.jpg: ERROR bad\\nline",
        "tab\\tand\\u001b[31mred.jpg: ERROR bad\\nline",
        "back\\\\slash.jpg: ERROR bad\\nline",
        "rtl\\u202egpj.exe: ERROR bad\\nline",
        "é.jpg: ERROR bad\\nline",
    ]
    out.getvalue().encode("utf-8")  # no lone surrogate left: any terminal can show it
    # A message quoting an escaped name is made one line again without escaping it twice.
    once = printable("a\\b\n" + UNDECODABLE)
    assert once == "a\\\\b\\ncaf\\xe9.jpg" and printable(f"x: {once}", backslashes=False) == f"x: {once}"
    # A message of several lines keeps its lines; each is still made safe.
    message = "no source:\n  - http://user:s3cret@host/w.pth: \x1b[31mrefused\r\n" + UNDECODABLE
    assert printable(message, lines=True).split("\n") == [
        "no source:",
        "  - http://***@host/w.pth: \\u001b[31mrefused\\r",
        "caf\\xe9.jpg",
    ]


def test_every_name_round_trips_through_json_lines_and_csv_files(tmp_path):
    prediction = {"index": 1, "wnid": None, "label": "x", "probability": 0.5}
    records = [{"input": name, "predictions": [prediction]} for name in AWKWARD]
    records.append({"input": UNDECODABLE + "2", "error": "e"})
    for fmt in ("jsonl", "csv"):
        path = tmp_path / f"out.{fmt}"
        write_records(records, path, fmt)
        assert read_records(path, fmt) == records, fmt
    # CSV keeps the file system's bytes: the name as `ls` would list it.
    assert b"caf\xe9.jpg" in (tmp_path / "out.csv").read_bytes()
    assert b"\\udce9" in (tmp_path / "out.jsonl").read_bytes()  # JSON lines stay ASCII


def test_passwords_in_urls_never_reach_text():
    record = {"input": "http://user:s3cret@127.0.0.1:1/a.jpg", "error": "from http://u:pw@host/x: refused"}
    out = io.StringIO()
    write_text([record], out)
    assert "s3cret" not in out.getvalue() and "pw@" not in out.getvalue()
    assert printable("http://user:s3cret@host/a.jpg") == "http://***@host/a.jpg"


def test_unexpected_errors_give_their_type_and_a_bounded_message():
    assert failure_reason(RuntimeError("Could not determine home directory.")) == (
        "RuntimeError: Could not determine home directory."
    )
    assert failure_reason(KeyError()) == "KeyError"
    long = failure_reason(ValueError("x" * 10_000))
    assert len(long) == 500 and long.startswith("ValueError: xxx")
