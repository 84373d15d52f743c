"""Output files of records: refused up front when they cannot be written, and no record lost when one fails."""

from __future__ import annotations

import io

import pytest

from resnext_hub.outputs import check_output, write_output
from resnext_hub.results import WRITERS, Result, read_csv


def test_a_file_that_fails_while_written_loses_no_record(tmp_path):
    records = [Result(f"{i}.jpg", error="e").as_record() for i in range(3)]
    for fmt in ("json", "csv", "text"):
        stdout = io.StringIO()
        problem = write_output(iter(records), fmt, "/dev/full", stdout=stdout)
        assert "writing /dev/full failed (No space left on device) after 0 result(s)" in problem
        expected = io.StringIO()
        WRITERS[fmt](records, expected)
        assert stdout.getvalue() == expected.getvalue(), fmt  # all of them, header included
    # A file that works gets everything, stdout nothing.
    stdout = io.StringIO()
    assert write_output(iter(records), "csv", tmp_path / "new" / "out.csv", stdout=stdout) is None
    assert read_csv(io.StringIO((tmp_path / "new" / "out.csv").read_text())) == records and not stdout.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: tmp / "file.txt" / "out.jsonl", "file.txt is a file, not a folder"),
        (lambda tmp: tmp / "file.txt" / "deeper" / "out.jsonl", "file.txt is a file, not a folder"),
    ],
)
def test_outputs_that_cannot_be_written_are_refused_up_front(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=message):
        check_output(make(tmp_path))
    assert check_output(tmp_path / "missing" / "folders" / "out.jsonl")  # created when written
