"""``predict``: 2 processes write exactly what 1 writes; a run stopped by SIGTERM resumes without loss or repeats.

The interrupted run reads its images from a real HTTP server on 127.0.0.1 that holds back the
last five until the test lets them go: the run is stopped (SIGTERM to torchrun, as a scheduler
would) at a known point, after the first 8 results are on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import RGB_PHOTOS
from test_evaluate import ARCH, BROKEN, cli_command, cli_env, photo_variants, run_cli, write_checkpoint
from unprivileged import public_dir, run_unprivileged

from resnext_hub.cli import main
from resnext_hub.data import collect_inputs
from resnext_hub.predict import _merge, open_job, parts_dir, read_records, write_records
from tools.fake_checkpoints import random_state_dict

HELD_FROM = 8  # the server holds back the inputs from this index on


class _GatedHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests[self.path] = self.server.requests.get(self.path, 0) + 1
        if self.path in self.server.held:
            self.server.gate.wait(timeout=120)
        super().do_GET()


class GatedServer:
    """Serves ``root`` on 127.0.0.1; GETs of ``held`` paths wait until :meth:`release`."""

    def __init__(self, root: Path) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_GatedHandler, directory=str(root)))
        self.httpd.requests, self.httpd.held, self.httpd.gate = {}, set(), threading.Event()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def release(self) -> None:
        self.httpd.gate.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> dict:
    """A folder tree of 12 photos and a broken JPEG (13 inputs) and a checkpoint."""
    base = tmp_path_factory.mktemp("predict")
    tree = base / "photos"
    for i, (name, image) in enumerate(photo_variants()):
        folder = tree / ("a" if i < 6 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}.jpg", quality=90)
    (tree / "b" / "broken.jpg").write_bytes(BROKEN)
    checkpoint = write_checkpoint(base)
    common = ["--model", ARCH, "--checkpoint", str(checkpoint), "--batch-size", "4", "--workers", "1"]
    common += ["--precision", "fp32"]
    return {"base": base, "tree": tree, "common": common}


@pytest.fixture(scope="module")
def photos(photo_tree) -> dict:
    """:func:`photo_tree` and the 1-process output (a subprocess: only the slow tests ask for it)."""
    base, tree, common = photo_tree["base"], photo_tree["tree"], photo_tree["common"]
    single = run_cli(["predict", str(tree), "-o", str(base / "one.jsonl"), *common], base)
    return {**photo_tree, "single": single, "one": base / "one.jsonl"}


@pytest.mark.slow
def test_one_process_classifies_every_input_once_in_order(photos):
    run = photos["single"]
    assert run.returncode == 1, run.stderr  # 1: one input could not be read
    records = read_records(photos["one"], "jsonl")
    assert [r["input"] for r in records] == collect_inputs([str(photos["tree"])])
    assert len(records) == 13 and not parts_dir(photos["one"]).exists()
    [bad] = [r for r in records if "error" in r]
    assert bad["input"].endswith("broken.jpg") and "broken.jpg: ERROR" in run.stderr
    assert "on 1 process(es) in fp32)" in run.stderr  # the one options record reached the engine
    for record in (r for r in records if "error" not in r):
        predictions = record["predictions"]  # classify --format json's record
        assert len(predictions) == 5 and {"index", "wnid", "label", "probability"} <= set(predictions[0])
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert predictions[0]["wnid"].startswith("n") and predictions[0]["label"]


@pytest.mark.slow
def test_torchrun_two_processes_write_exactly_the_one_process_output(photos):
    two = photos["base"] / "two.jsonl"
    run = run_cli(["predict", str(photos["tree"]), "-o", str(two), *photos["common"]], photos["base"], nproc=2)
    assert two.exists(), run.stderr[-3000:]
    assert two.read_bytes() == photos["one"].read_bytes()
    assert run.stderr.count("13 inputs: 12 classified, 1 unreadable; 13 done now") == 1  # rank 0 only


def _part_records(output: Path) -> list[dict]:
    return open_job(output).done if parts_dir(output).is_dir() else []


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_loses_nothing_and_repeats_nothing(photos):
    base, tree = photos["base"], photos["tree"]
    one = read_records(photos["one"], "jsonl")
    relative = [Path(r["input"]).relative_to(tree).as_posix() for r in one]
    server = GatedServer(tree)
    try:
        urls = [f"{server.url}/{path}" for path in relative]
        server.httpd.held.update(f"/{path}" for path in relative[HELD_FROM:])
        (base / "urls.txt").write_text("# photos served over HTTP\n\n" + "\n".join(urls + urls[:2]) + "\n")
        output = base / "resumed.csv"
        args = ["predict", "--list", str(base / "urls.txt"), "-o", str(output), *photos["common"]]

        # 1. Two processes under torchrun, stopped with SIGTERM once the first 8 results are written.
        process = subprocess.Popen(
            cli_command(args, nproc=2), cwd=base, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 180
        while len(_part_records(output)) < HELD_FROM and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=120)[0].decode(errors="replace")
        assert process.returncode != 0, log[-3000:]
        assert not output.exists()
        assert sorted(r["input"] for r in _part_records(output)) == sorted(urls[:HELD_FROM]), log[-3000:]

        # 2. Resume in one process: only the 5 missing inputs are fetched and classified.
        server.release()
        run = run_cli(args, base)
        assert run.returncode == 1, run.stderr  # the broken JPEG
        assert "5 done now" in run.stderr and "8 done before" in run.stderr
        assert all(server.httpd.requests[f"/{path}"] == 1 for path in relative[:HELD_FROM])
    finally:
        server.close()

    resumed = read_records(output, "csv")
    assert [r["input"] for r in resumed] == urls  # each input once, in input order, repeats in the list dropped
    assert not parts_dir(output).exists()
    # The same batches as the uninterrupted run, so the same numbers, also through CSV.
    assert [{**r, "input": None} for r in resumed] == [{**r, "input": None} for r in one]


def test_records_survive_csv_and_a_cut_off_part_line(tmp_path):
    records = [
        {
            "input": "a, b.jpg",
            "predictions": [
                {"index": 3, "wnid": "n1", "label": 'x, "y"', "probability": 0.5},
                {"index": 1, "wnid": None, "label": "z", "probability": 0.25},
            ],
        },
        {"input": "bad.jpg", "error": "not an image"},
    ]
    write_records(records, tmp_path / "out.csv", "csv")
    assert read_records(tmp_path / "out.csv", "csv") == records
    parts = parts_dir(tmp_path / "out.jsonl")
    parts.mkdir()
    (parts / "1-rank00000.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:20])
    job = open_job(tmp_path / "out.jsonl")
    assert job.done == records[:1]  # the cut line is dropped, so that input is done again


def test_an_input_without_a_result_is_reported_and_its_parts_kept(tmp_path):
    output = tmp_path / "out.jsonl"
    parts_dir(output).mkdir()
    (parts_dir(output) / "1-rank00000.jsonl").write_text(json.dumps({"input": "a.jpg", "error": "x"}) + "\n")
    summary = _merge(open_job(output), ["a.jpg", "b.jpg"])  # rank 1's part (b.jpg) is not visible here
    assert summary["missing"] == ["b.jpg"] and summary["failed"] == 1 and summary["classified"] == 0
    assert read_records(output, "jsonl") == [{"input": "a.jpg", "error": "x"}]
    assert (parts_dir(output) / "1-rank00000.jsonl").exists()


@pytest.mark.slow
def test_resuming_with_another_top_k_is_refused(photos, capsys):
    args = ["predict", str(photos["tree"]), "-o", str(photos["one"]), "--top-k", "3", "--checkpoint", "/nonexistent"]
    assert main(args) == 2
    assert "top-5 results but --top-k is 3" in capsys.readouterr().err


# -- issue 13: a resume continues the same job; names; outputs; skipped folders -------------------------------

UNDECODABLE = os.fsdecode(b"caf\xe9.jpg")


@pytest.fixture(scope="module")
def small_job(tmp_path_factory, photo_tree) -> dict:
    """Three photos, one not UTF-8-named and one with a newline in its name, and a list file whose entry raises."""
    base = tmp_path_factory.mktemp("small_job")
    tree = base / "photos"
    tree.mkdir()
    for name, source in zip(
        (UNDECODABLE, "new\nline.jpg", "plain.jpg"), sorted(photo_tree["tree"].rglob("*_full.jpg"))
    ):
        shutil.copy(source, tree / name)
    # The latin-1 list repeats the photo (kept once); "~no-such-user-h13/..." makes the loader raise RuntimeError.
    (base / "list.txt").write_bytes(b"%s\n~no-such-user-h13/x.jpg\n" % os.fsencode(tree / UNDECODABLE))
    checkpoint = write_checkpoint(base)
    return {"base": base, "tree": tree, "checkpoint": checkpoint, "common": _options(checkpoint)}


def _options(checkpoint) -> list[str]:
    options = ["--model", ARCH, "--batch-size", "2", "--workers", "0", "--precision", "fp32"]
    return options + (["--checkpoint", str(checkpoint)] if checkpoint else [])


@pytest.mark.slow
def test_a_csv_job_with_awkward_names_completes_and_resumes(small_job):
    base, tree = small_job["base"], small_job["tree"]
    output = base / "names.csv"
    args = ["predict", str(tree), "--list", str(base / "list.txt"), "-o", str(output), *small_job["common"]]
    first = run_cli(args, base)
    assert first.returncode == 1, first.stderr  # the input that raised
    assert "Traceback" not in first.stderr
    assert "~no-such-user-h13/x.jpg: ERROR RuntimeError: Could not determine home directory." in first.stderr
    records = read_records(output, "csv")
    expected = [str(tree / name) for name in (UNDECODABLE, "new\nline.jpg", "plain.jpg")] + ["~no-such-user-h13/x.jpg"]
    assert [r["input"] for r in records] == expected
    assert os.fsencode(tree / UNDECODABLE) in output.read_bytes()  # the name's own bytes
    again = run_cli(args, base)
    assert again.returncode == 1, again.stderr
    assert "0 done now" in again.stderr and "4 done before" in again.stderr
    assert read_records(output, "csv") == records


@pytest.mark.slow
def test_resuming_with_other_weights_is_refused_before_the_model_loads(small_job):
    base, tree = small_job["base"], small_job["tree"]
    output = base / "job.jsonl"
    args = ["predict", str(tree), "-o", str(output), *small_job["common"]]
    assert run_cli(args, base).returncode == 0
    before = output.read_bytes()

    other = base / "other" / f"{ARCH}.pth"
    other.parent.mkdir()
    torch.save(random_state_dict(ARCH, seed=11), other)
    run = run_cli(["predict", str(tree), "-o", str(output), *_options(other)], base)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "holds results of model seresnext26d_32x4d, checkpoint" in run.stderr
    assert "differs in checkpoint" in run.stderr and "write to another --output" in run.stderr
    assert output.read_bytes() == before
    # The published weights are another job too (refused before any download).
    assert main(["predict", str(tree), "-o", str(output), *_options(None)]) == 2
    job = json.loads((base / "job.jsonl.job.json").read_text())  # what identifies the job, beside the output
    assert job["model"] == ARCH and job["top_k"] == 5 and len(job["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_top_k_above_the_class_count_resumes(small_job, capsys):
    base, tree = small_job["base"], small_job["tree"]
    output = base / "all.jsonl"
    args = ["predict", str(tree / "plain.jpg"), "-o", str(output), "--top-k", "2000", *small_job["common"]]
    assert main(args) == 0
    assert len(read_records(output, "jsonl")[0]["predictions"]) == 1000
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err  # the same job: all 1000 classes
    assert "0 done now" in capsys.readouterr().err
    assert main([*args[:4], "--top-k", "999", *args[6:]]) == 2
    assert "top-1000 results but --top-k is 999" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "fifo", "below a file"])
def test_an_output_that_cannot_be_replaced_is_refused_before_the_model_loads(tmp_path, kind, capsys):
    output = tmp_path / "out.jsonl"
    if kind == "folder":
        output.mkdir()
    elif kind == "fifo":
        os.mkfifo(output)  # reading it would block; replacing it would swap a pipe for a file
    else:
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "out.jsonl"
    args = ["predict", str(RGB_PHOTOS[0]), "-o", str(output), "--model", ARCH, "--checkpoint", "/nonexistent.pth"]
    status, stderr = main(args), capsys.readouterr().err  # in this process: the check is not about the process
    assert status == 2, stderr
    assert stderr.startswith("error: --output") and "checkpoint" not in stderr


# Run as a user whom permissions stop (tests/unprivileged.py): the job is opened, then its folder made read-only.
_MERGE_INTO_A_READ_ONLY_FOLDER = """
import json, sys
from pathlib import Path
from resnext_hub.predict import _merge, open_job, parts_dir, write_records

output = Path(sys.argv[1]) / "out.jsonl"
output.parent.mkdir()
write_records([{"input": "a.jpg", "error": "x"}], output, "jsonl")
parts_dir(output).mkdir()
(parts_dir(output) / "1-rank00000.jsonl").write_text(json.dumps({"input": "b.jpg", "error": "y"}) + "\\n")
job = open_job(output)
output.parent.chmod(0o555)
print(json.dumps(_merge(job, ["a.jpg", "b.jpg"])))
"""


@pytest.mark.slow  # a process as user nobody
def test_a_merge_that_cannot_be_written_keeps_the_parts():
    with public_dir() as base:
        command = [sys.executable, "-c", _MERGE_INTO_A_READ_ONLY_FOLDER, str(base / "job")]
        run = run_unprivileged(command, cwd=base, env=cli_env())
        assert run.returncode == 0, run.stderr
        summary = json.loads(run.stdout.splitlines()[-1])
        assert summary["write_error"] == "Permission denied" and summary["missing"] == []
        output = base / "job" / "out.jsonl"
        assert read_records(output, "jsonl") == [{"input": "a.jpg", "error": "x"}]  # the old output, whole
        assert (parts_dir(output) / "1-rank00000.jsonl").exists()
        assert sorted(p.name for p in output.parent.iterdir()) == ["out.jsonl", "out.jsonl.parts"]


def test_predict_with_default_options_prints_no_library_warning(small_job, tmp_path, capsys):
    # Default --workers: the usable CPUs, never more (PyTorch warns about more DataLoader workers than CPUs).
    args = ["predict", str(small_job["tree"] / "plain.jpg"), "-o", str(tmp_path / "out.jsonl")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning raised in this process fails the run
        assert main([*args, "--model", ARCH, "--checkpoint", str(small_job["checkpoint"])]) == 0
    err = capsys.readouterr().err
    assert "Warning" not in err and "warning" not in err and "1 inputs: 1 classified" in err


@pytest.mark.slow
def test_a_folder_that_cannot_be_read_is_reported_and_fails_the_run(small_job):
    with public_dir() as base:
        tree = base / "photos"
        shutil.copytree(small_job["tree"], tree)
        (tree / "locked").mkdir()
        shutil.copy(tree / "plain.jpg", tree / "locked" / "hidden.jpg")
        (tree / "locked").chmod(0o000)
        checkpoint = base / f"{ARCH}.pth"
        shutil.copy(small_job["checkpoint"], checkpoint)
        args = ["predict", str(tree), "-o", str(base / "out.jsonl"), *_options(checkpoint)]
        run = run_unprivileged(cli_command(args), cwd=base, env={**cli_env(), "HOME": str(base)})
        assert run.returncode == 1, run.stderr
        assert f"warning: folder {tree}/locked could not be read (Permission denied): its images were skipped" in (
            run.stderr
        )
        assert "3 inputs: 3 classified, 0 unreadable" in run.stderr
        assert "warning: 1 folder(s) could not be read" in run.stderr
