"""The command line end to end: files, folders, URLs, output formats, bad inputs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import IMAGES, ROOT
from servers import FileServer

from resnext_hub import processing
from resnext_hub.models import build_model

ARCH = "seresnext26d_32x4d"


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "nested").mkdir()
    shutil.copy(IMAGES / "chelsea.jpg", folder / "chelsea.jpg")
    shutil.copy(IMAGES / "camera.png", folder / "nested" / "camera.png")
    (folder / "notes.txt").write_text("not an image, and not picked up by the folder walk")
    (folder / "broken.jpg").write_bytes(b"<html>404</html>")
    return folder


def classify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnext_hub", "classify", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def expected_top(checkpoint, path, k):
    model = build_model(ARCH, pretrained_from_file=checkpoint)
    batch = processing.prepare_batch([path], preprocessing=model)
    with torch.no_grad():
        return processing.top_k(model(batch), k, logits=True)[0]


def test_folder_to_json_lines_matches_library(checkpoint, photos):
    result = classify(
        str(photos), "--model", ARCH, "--checkpoint", str(checkpoint), "--format", "json", "--top-k", "3", "--exact"
    )
    assert result.returncode == 1, result.stderr  # one input failed
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == [
        str(photos / n) for n in ("broken.jpg", "chelsea.jpg", "nested/camera.png")
    ]
    assert "not an image" in records[0]["error"]
    assert "1 of 3 inputs could not be classified" in result.stderr
    for record in records[1:]:
        expected = expected_top(checkpoint, record["input"], 3)
        got = record["predictions"]
        assert [p["index"] for p in got] == [p.index for p in expected]
        assert [p["probability"] for p in got] == pytest.approx([p.probability for p in expected], abs=1e-4)
        assert {"index", "wnid", "label", "probability"} <= set(got[0])


def test_url_and_file_to_csv_file(checkpoint, tmp_path):
    out = tmp_path / "out.csv"
    with FileServer(IMAGES) as server:
        url = f"{server.url}/coffee.jpg"
        result = classify(
            url,
            str(IMAGES / "rocket.jpg"),
            "--model",
            ARCH,
            "--checkpoint",
            str(checkpoint),
            "--format",
            "csv",
            "-o",
            str(out),
            "--batch-size",
            "1",
            "--no-progress",
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 10 and {r["input"] for r in rows} == {url, str(IMAGES / "rocket.jpg")}
    assert [r["rank"] for r in rows[:5]] == ["1", "2", "3", "4", "5"] and rows[0]["wnid"].startswith("n")


def test_text_output_and_progress(checkpoint):
    result = classify(str(IMAGES / "chelsea.jpg"), "--model", ARCH, "--checkpoint", str(checkpoint), "--progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("chelsea.jpg") and len(lines) == 6 and lines[1].lstrip().startswith("1.")
    assert "1/1" in result.stderr  # the progress bar


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/dir/"], "no such file"),
        (["--top-k", "0", "x.jpg"], "--top-k must be at least 1"),
        (["--model", "resnet50", "x.jpg"], "invalid choice: 'resnet50'"),
    ],
)
def test_bad_usage_is_explained(args, message):
    result = classify(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_missing_checkpoint_is_a_clear_error():
    result = classify(str(IMAGES / "chelsea.jpg"), "--model", ARCH, "--checkpoint", "/nonexistent.pth")
    assert result.returncode == 2 and "error: checkpoint /nonexistent.pth does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_command_lists_the_manifest():
    result = subprocess.run([sys.executable, "-m", "resnext_hub", "models"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    assert "se_resnext101_32x4d.ngc_20.06" in result.stdout and "45,251,128" in result.stdout
