"""The shared result record: classify's JSON line, its CSV rows and text, and reading them back."""

from __future__ import annotations

import io
import json

import pytest

from resnext_hub.processing import Prediction
from resnext_hub.results import Result, read_csv, read_jsonl, write_csv, write_jsonl, write_text

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
