"""``predict``: 2 processes write exactly what 1 writes; a run stopped by SIGTERM resumes without loss or repeats.

The interrupted run reads its images from a real HTTP server on 127.0.0.1 that holds back the
last five until the test lets them go: the run is stopped (SIGTERM to torchrun, as a scheduler
would) at a known point, after the first 8 results are on disk.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_evaluate import ARCH, BROKEN, cli_command, cli_env, photo_variants, run_cli, write_checkpoint

from resnext_hub.cli import main
from resnext_hub.data import collect_inputs
from resnext_hub.predict import _merge, load_done, parts_dir, read_records, write_records

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
def photos(tmp_path_factory) -> dict:
    """A folder tree of 12 photos and a broken JPEG (13 inputs), a checkpoint, and the 1-process output."""
    base = tmp_path_factory.mktemp("predict")
    tree = base / "photos"
    for i, (name, image) in enumerate(photo_variants()):
        folder = tree / ("a" if i < 6 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}.jpg", quality=90)
    (tree / "b" / "broken.jpg").write_bytes(BROKEN)
    checkpoint = write_checkpoint(base)
    common = ["--model", ARCH, "--checkpoint", str(checkpoint), "--batch-size", "4", "--workers", "1", "--exact"]
    single = run_cli(["predict", str(tree), "-o", str(base / "one.jsonl"), *common], base)
    return {"base": base, "tree": tree, "common": common, "single": single, "one": base / "one.jsonl"}


def test_one_process_classifies_every_input_once_in_order(photos):
    run = photos["single"]
    assert run.returncode == 1, run.stderr  # 1: one input could not be read
    records = read_records(photos["one"], "jsonl")
    assert [r["input"] for r in records] == collect_inputs([str(photos["tree"])])
    assert len(records) == 13 and not parts_dir(photos["one"]).exists()
    [bad] = [r for r in records if "error" in r]
    assert bad["input"].endswith("broken.jpg") and "broken.jpg: ERROR" in run.stderr
    for record in (r for r in records if "error" not in r):
        predictions = record["predictions"]  # classify --format json's record
        assert len(predictions) == 5 and {"index", "wnid", "label", "probability"} <= set(predictions[0])
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert predictions[0]["wnid"].startswith("n") and predictions[0]["label"]


def test_torchrun_two_processes_write_exactly_the_one_process_output(photos):
    two = photos["base"] / "two.jsonl"
    run = run_cli(["predict", str(photos["tree"]), "-o", str(two), *photos["common"]], photos["base"], nproc=2)
    assert two.exists(), run.stderr[-3000:]
    assert two.read_bytes() == photos["one"].read_bytes()
    assert run.stderr.count("13 inputs: 12 classified, 1 unreadable; 13 done now") == 1  # rank 0 only


def _part_records(output: Path) -> list[dict]:
    return load_done(output, "csv", 5)[0] if parts_dir(output).is_dir() else []


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
    done, _ = load_done(tmp_path / "out.jsonl", "jsonl", 2)
    assert done == records[:1]  # the cut line is dropped, so that input is done again


def test_an_input_without_a_result_is_reported_and_its_parts_kept(tmp_path):
    output = tmp_path / "out.jsonl"
    parts_dir(output).mkdir()
    (parts_dir(output) / "1-rank00000.jsonl").write_text(json.dumps({"input": "a.jpg", "error": "x"}) + "\n")
    summary = _merge(output, "jsonl", 5, ["a.jpg", "b.jpg"])  # rank 1's part (b.jpg) is not visible here
    assert summary["missing"] == ["b.jpg"] and summary["failed"] == 1 and summary["classified"] == 0
    assert read_records(output, "jsonl") == [{"input": "a.jpg", "error": "x"}]
    assert (parts_dir(output) / "1-rank00000.jsonl").exists()


def test_resuming_with_another_top_k_is_refused(photos, capsys):
    args = ["predict", str(photos["tree"]), "-o", str(photos["one"]), "--top-k", "3", "--checkpoint", "/nonexistent"]
    assert main(args) == 2
    assert "top-5 results but --top-k is 3" in capsys.readouterr().err
