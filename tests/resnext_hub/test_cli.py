"""The command line end to end: files, folders, URLs, output formats, bad inputs."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import IMAGES, ROOT
from servers import FileServer
from unprivileged import public_dir, run_unprivileged

from resnext_hub import exit_codes, processing
from resnext_hub.arguments import check_options, inference_options
from resnext_hub.cli import build_parser, main
from resnext_hub.models import build_model
from resnext_hub.models.download import MIRROR_ENV

pytestmark = pytest.mark.slow  # the command line in subprocesses

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
        str(photos),
        "--model",
        ARCH,
        "--checkpoint",
        str(checkpoint),
        "--format",
        "json",
        "--top-k",
        "3",
        "--precision",
        "fp32",
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
    assert result.returncode == exit_codes.WEIGHTS_UNAVAILABLE, result.stderr
    assert "error: checkpoint /nonexistent.pth does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unavailable_weights_are_explained_on_their_lines_with_their_own_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, "http://user:s3cret@127.0.0.1:1/weights")  # nothing listens on port 1
    assert main(["classify", str(IMAGES / "chelsea.jpg"), "--model", ARCH]) == exit_codes.WEIGHTS_UNAVAILABLE
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: no source of these weights could be used:" and lines[1].startswith("  - "), lines
    assert lines[-1].startswith("Cache folder: ") and "\\n" not in "".join(lines) and "s3cret" not in "".join(lines)


@pytest.mark.slow
def test_a_normal_run_shows_no_library_warnings(checkpoint, tmp_path):
    """What the user's terminal gets: our own lines, no library's Python warning or logged warning."""
    model = ["--model", ARCH, "--checkpoint", str(checkpoint)]
    runs = [
        ["classify", str(IMAGES / "chelsea.jpg"), *model],
        ["export", *model, "--format", "onnx", "--image-size", "64", "-o", str(tmp_path / "m.onnx")],
    ]
    for argv in runs:
        result = subprocess.run(
            [sys.executable, "-m", "resnext_hub", *argv], capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        # "UserWarning: ..." and torch's logged "W1204 17:10:15.398000 123 torch/...] ..." lines.
        foreign = [line for line in result.stderr.splitlines() if "Warning" in line or re.match(r"[WE]\d{4} ", line)]
        assert not foreign, f"{argv[0]}: {foreign}"


def test_models_command_lists_the_manifest():
    result = subprocess.run([sys.executable, "-m", "resnext_hub", "models"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    assert "se_resnext101_32x4d.ngc_20.06" in result.stdout and "45,251,128" in result.stdout


# -- issue 13: one bad input fails alone; outputs, names and usage errors -----------------------------------

NAMES = [os.fsdecode(b"caf\xe9.jpg"), "new\nline.jpg", "esc\x1b[2Jape.jpg"]  # not UTF-8; a newline; a terminal code
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # runnable from any folder
STRICT = {**ENV, "PYTHONIOENCODING": "utf-8:strict"}  # a UTF-8 terminal, which refuses lone surrogates


def run_classify(*args: str, cwd=ROOT, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnext_hub", "classify", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    for name in NAMES:
        shutil.copy(IMAGES / "chelsea.jpg", folder / name)
    return folder


def test_an_input_that_raises_anything_costs_one_record_not_the_run(checkpoint, tmp_path):
    # "~no-such-user-h13/..." is a real folder here; the loader expands "~user" and pathlib raises RuntimeError.
    (tmp_path / "~no-such-user-h13").mkdir()
    shutil.copy(IMAGES / "rocket.jpg", tmp_path / "~no-such-user-h13" / "rocket.jpg")
    model = ["--model", ARCH, "--checkpoint", str(checkpoint), "--format", "json", "--top-k", "2"]
    result = run_classify("~no-such-user-h13", str(IMAGES / "chelsea.jpg"), *model, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    bad, good = [json.loads(line) for line in result.stdout.splitlines()]
    assert bad == {
        "input": "~no-such-user-h13/rocket.jpg",
        "error": "RuntimeError: Could not determine home directory.",
    }
    assert len(good["predictions"]) == 2 and "1 of 2 inputs could not be classified" in result.stderr


def test_names_that_are_not_utf8_or_hold_control_characters_survive_every_format(checkpoint, awkward, tmp_path):
    model = ["--model", ARCH, "--checkpoint", str(checkpoint), "--top-k", "2", "--precision", "fp32"]
    expected = sorted(str(awkward / name) for name in NAMES)

    text = run_classify(str(awkward), *model, env=STRICT)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 3 * 3  # no name forged a line
    assert [line for line in lines if not line.startswith(" ")] == [
        f"{awkward}/caf\\xe9.jpg",
        f"{awkward}/esc\\u001b[2Jape.jpg",
        f"{awkward}/new\\nline.jpg",
    ]
    assert "\x1b" not in text.stdout

    out = tmp_path / "out.jsonl"
    jsonl = run_classify(str(awkward), *model, "--format", "json", "-o", str(out), env=STRICT)
    assert jsonl.returncode == 0, jsonl.stderr
    records = [json.loads(line) for line in out.read_text(encoding="ascii").splitlines()]
    assert [r["input"] for r in records] == expected

    table = run_classify(str(awkward), *model, "--format", "csv", env=STRICT)  # CSV on stdout, bytes kept
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout, newline="")))
    assert sorted({row["input"] for row in rows}) == expected
    assert [r["input"] for r in records] == [row["input"] for row in rows[::2]]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda tmp: tmp, "is a folder: give the path of a file"),
        (lambda tmp: tmp / "file.txt" / "out.jsonl", "file.txt is a file, not a folder"),
    ],
)
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, output, message):
    (tmp_path / "file.txt").write_text("not a folder")
    # A checkpoint that does not exist: had the model loaded first, the error would be about it.
    result = run_classify(str(IMAGES / "chelsea.jpg"), "--checkpoint", "/nonexistent.pth", "-o", str(output(tmp_path)))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "checkpoint" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")


def test_an_output_without_write_permission_fails_before_the_model_loads():
    with public_dir() as base:
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # root's: nobody may not create files in it
        command = [sys.executable, "-m", "resnext_hub", "classify", str(IMAGES / "chelsea.jpg")]
        result = run_unprivileged(
            [*command, "--checkpoint", "/nonexistent.pth", "-o", str(locked / "out.csv")], cwd=ROOT
        )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == f"error: --output {locked}/out.csv: no permission to create files in {locked}: give another path\n"
    )


def test_an_output_that_fails_while_written_loses_no_result(checkpoint):
    model = ["--model", ARCH, "--checkpoint", str(checkpoint), "--top-k", "2", "--format", "json"]
    result = run_classify(str(IMAGES / "chelsea.jpg"), str(IMAGES / "rocket.jpg"), *model, "-o", "/dev/full")
    assert result.returncode == 1, result.stderr
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [
        str(IMAGES / "chelsea.jpg"),
        str(IMAGES / "rocket.jpg"),
    ]
    assert "error: writing /dev/full failed (No space left on device) after 0 result(s)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99"])
def test_a_bad_device_is_a_usage_error(device):
    result = run_classify(str(IMAGES / "chelsea.jpg"), "--device", device, "--checkpoint", "/nonexistent.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: --device: device '{device}'" in result.stderr


def test_passwords_in_urls_are_never_repeated(checkpoint):
    with FileServer(IMAGES) as server:
        url = server.url.replace("http://", "http://user:s3cret@") + "/missing.jpg"
        result = run_classify(url, str(IMAGES / "chelsea.jpg"), "--model", ARCH, "--checkpoint", str(checkpoint))
    assert result.returncode == 1, result.stderr
    assert "missing.jpg: ERROR could not be fetched" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    # Not a valid URL (its port): taken for a missing file, and still not repeated.
    result = run_classify("http://user:s3cret@127.0.0.1:99999/x.jpg", "--checkpoint", "/nonexistent.pth")
    assert result.returncode == 2 and "s3cret" not in result.stderr and "no such file" in result.stderr


def test_a_reader_that_goes_away_stops_the_run_without_a_traceback(checkpoint, awkward):
    command = [sys.executable, "-m", "resnext_hub", "classify", str(awkward), str(IMAGES)]
    command += ["--model", ARCH, "--checkpoint", str(checkpoint), "--batch-size", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    stderr = process.communicate(timeout=300)[1].decode()
    assert process.returncode == 1 and "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "error: standard output was closed" in stderr


def test_an_output_that_is_one_of_the_inputs_is_refused(checkpoint, tmp_path):
    photo = tmp_path / "photo.jpg"
    shutil.copy(IMAGES / "chelsea.jpg", photo)
    result = run_classify(str(tmp_path), "--model", ARCH, "--checkpoint", str(checkpoint), "-o", str(photo))
    assert result.returncode == 2 and "is one of the inputs" in result.stderr
    assert photo.read_bytes() == (IMAGES / "chelsea.jpg").read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--format", "onnx", "-o", "{tmp}/m.onnx", "--image-size", "-5"], "--image-size must be at least 1, got -5"),
        (["--format", "torchscript", "-o", "{tmp}/file/m.pt"], "file is a file, not a folder"),
        (["--format", "onnx", "-o", "{tmp}"], "is a folder: give the path of a file"),
        (["--format", "triton", "-o", "{tmp}/file"], "is not a folder (a Triton model repository is one)"),
        (["--format", "triton", "-o", "{tmp}/repo", "--preferred-batch-sizes", "0,8"], "[0] are outside 1..--max"),
    ],
)
def test_export_usage_errors_come_before_the_model_loads(tmp_path, options, message):
    (tmp_path / "file").write_text("x")
    command = ["export", "--model", ARCH, "--checkpoint", "/nonexistent.pth"]
    result = subprocess.run(
        [sys.executable, "-m", "resnext_hub", *command, *[o.format(tmp=tmp_path) for o in options]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "checkpoint" not in result.stderr


def test_a_folder_that_cannot_be_read_is_reported_and_fails_the_run(checkpoint):
    with public_dir() as base:
        photos = base / "photos"
        (photos / "locked").mkdir(parents=True)
        shutil.copy(IMAGES / "chelsea.jpg", photos / "chelsea.jpg")
        shutil.copy(IMAGES / "rocket.jpg", photos / "locked" / "rocket.jpg")
        (photos / "locked").chmod(0o000)
        shutil.copy(checkpoint, base / "model.pth")
        command = [sys.executable, "-m", "resnext_hub", "classify", str(photos), "--format", "json"]
        command += ["--model", ARCH, "--checkpoint", str(base / "model.pth")]
        result = run_unprivileged(command, cwd=ROOT, env={**ENV, "HOME": str(base)})
    assert result.returncode == 1, result.stderr
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(photos / "chelsea.jpg")]
    assert f"warning: folder {photos}/locked could not be read (Permission denied): its images were skipped" in (
        result.stderr
    )


# -- issue 19: one spelling of precision, one options record --------------------------------------------------

COMMANDS = {
    "classify": ["classify", "x.jpg"],
    "evaluate": ["evaluate", "val"],
    "predict": ["predict", "x.jpg", "-o", "{tmp}/out.jsonl"],
    "serve": ["serve"],
    "export": ["export", "--format", "pt2", "-o", "{tmp}/m.pt2"],
}


def _parsed(tmp_path, command: str, *options: str):
    args = build_parser().parse_args([a.format(tmp=tmp_path) for a in COMMANDS[command]] + list(options))
    return args, check_options(args)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_inference_command_and_export_take_precision(tmp_path, command, precision, capsys):
    args, problem = _parsed(tmp_path, command, "--precision", precision)
    assert problem is None and inference_options(args).precision == precision
    assert capsys.readouterr().err == ""  # the one spelling: no warning


@pytest.mark.parametrize("command", ["classify", "evaluate", "predict", "serve"])
def test_a_saved_openvino_ir_runs_on_the_cpu_when_the_device_is_auto(tmp_path, command):
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "model.xml").write_text("<net/>")  # only its name matters here
    args, _ = _parsed(tmp_path, command, "--checkpoint", str(tmp_path / "ir"))
    assert inference_options(args).device == "cpu"
    args, _ = _parsed(tmp_path, command)
    assert inference_options(args).device == "auto"  # a checkpoint file: CUDA where present


@pytest.mark.parametrize(
    ("command", "flag", "precision"),
    [
        ("classify", "--exact", "fp32"),
        ("classify", "--no-amp", "fp32"),
        ("evaluate", "--exact", "fp32"),
        ("predict", "--exact", "fp32"),
        ("serve", "--exact", "fp32"),
        ("serve", "--no-amp", "fp32"),
        ("export", "--fp16", "fp16"),
        ("export", "--bf16", "bf16"),
    ],
)
def test_each_old_flag_warns_once_and_means_its_precision(tmp_path, command, flag, precision, capsys):
    args, problem = _parsed(tmp_path, command, flag)
    assert problem is None and inference_options(args).precision == precision
    assert capsys.readouterr().err == f"warning: {flag} is deprecated; use --precision {precision}\n"
    other = "int8" if precision != "int8" else "fp32"
    for order in ([flag, "--precision", other], ["--precision", other, flag]):  # refused in either order
        _, problem = _parsed(tmp_path, command, *order, "--calibration", "calib")
        assert problem == f"{flag} means --precision {precision}; it cannot be combined with --precision {other}"
    _, problem = _parsed(tmp_path, command, flag, "--precision", precision)  # the same precision twice: fine
    assert problem is None


def test_the_options_record_is_built_once_from_the_arguments(tmp_path):
    args, problem = _parsed(
        tmp_path, "predict", "--device", "cpu", "--workers", "0", "--batch-size", "3", "--top-k", "2", "--compile"
    )
    options = inference_options(args)
    assert problem is None and (options.device, options.precision, options.workers) == ("cpu", "auto", 0)
    assert (options.batch_size, options.top_k, options.compile, options.calibration) == (3, 2, True, None)
    args, _ = _parsed(tmp_path, "classify", "--precision", "int8", "--calibration", str(IMAGES))
    assert inference_options(args).calibration == sorted(str(p) for p in IMAGES.iterdir() if p.suffix != ".md")
    args, _ = _parsed(tmp_path, "classify", "--precision", "int8", "--calibration", str(tmp_path))
    with pytest.raises(ValueError, match="no images found there"):
        inference_options(args)


def test_workers_default_to_the_usable_cpus_never_more(tmp_path):
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for command in ("evaluate", "predict"):
        assert 1 <= inference_options(_parsed(tmp_path, command)[0]).workers <= usable
    finetune = build_parser().parse_args(["finetune", "data", "-o", str(tmp_path / "run")])
    assert 1 <= finetune.workers <= usable
