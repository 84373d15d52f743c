"""``finetune`` as a careless user, a crashing machine or a full disk meets it (issue 20).

The rule: a bad input or a fault is one ``error:`` line naming the path and the fix, with a nonzero
exit and no traceback; a run's files are never overwritten or mixed with another run's; an
interrupted run leaves no temporary files, and ``--resume`` continues it to the result of an
uninterrupted one; a saved state that this code or model cannot continue is refused by field; class
names that are not text are refused, and names in any script work end to end.

Runs are tiny (seresnext26d_32x4d from random weights at 32 px, a few images per class, one process
each). Tests run as root, whom no permission bit stops: permission cases run the command as user
nobody (:mod:`unprivileged`); a full disk is a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) on
the child, whose writes past it fail with EFBIG as writes to a full disk fail with ENOSPC.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from test_evaluate import BROKEN, cli_command, cli_env, run_cli
from unprivileged import public_dir, run_unprivileged

from resnext_hub.cli import main
from resnext_hub.distributed import sigterm_as_exit
from resnext_hub.training import finetune
from resnext_hub.training.state import BEST, CURVES, LAST, METRICS, interruption, plot_curves
from tools.shapes_dataset import write_shapes_dataset

ARCH = "seresnext26d_32x4d"
RUN = ["--model", ARCH, "--no-pretrained", "--image-size", "32", "--batch-size", "6", "--workers", "0"]
RUN += ["--no-progress"]
TIMING = {"images_per_second", "train_seconds"}
OUTPUTS = (BEST, LAST, METRICS, CURVES)  # a run's files: anything else in its folder is debris
WORKER_FRAME = re.compile(r'File ".*resnext_hub/')  # a traceback through this project's code


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 training and 2 validation images per shape: 2 steps of 6 per epoch."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=4, val=2, size=40, seed=4, colour_coded=True)


def one_error_line(stderr: str) -> str:
    """The one ``error:`` line of a refusal (and nothing that looks like a traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def extra_files(out: Path) -> list[str]:
    """Anything in a run's folder besides its four outputs: staging files, a lock left behind."""
    return sorted(set(os.listdir(out)) - set(OUTPUTS)) if out.is_dir() else []


def link_run(source: Path, copy: Path) -> Path:
    """A copy of a finished run's folder; its checkpoints are hard links (a run replaces them, never writes
    into them), its metrics and curves are copies."""
    copy.mkdir()
    for path in source.iterdir():
        if path.suffix == ".pth":
            os.link(path, copy / path.name)
        else:
            shutil.copy(path, copy / path.name)
    return copy


def nobody_env(base: Path) -> dict[str, str]:
    return {**cli_env(), "HOME": str(base), "MPLCONFIGDIR": str(base / ".mpl")}


# -- 1. file-system faults: one error line, the right exit status ------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "below-a-file", "in-train"])
def test_an_output_that_is_no_folder_is_refused_before_any_work(where, data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = {"a-file": tmp_path / "file", "below-a-file": tmp_path / "file" / "run", "in-train": data / "train" / "run"}
    assert main(["finetune", str(data), "-o", str(out[where]), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--output {out[where]}" in line and ("give a folder" in line or "outside" in line), line
    assert not (data / "train" / "run").exists() and (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
@pytest.mark.parametrize("locked", ["data", "data/train", "data/train/circle", "out", "parent-of-out"])
def test_folders_this_user_cannot_read_or_write_are_one_error_line(locked, data):
    with public_dir() as base:
        copy = base / "data"
        shutil.copytree(data, copy)
        copy.chmod(0o755)  # the copy of pytest's private folder: open to user nobody
        (base / "parent-of-out" / "out").mkdir(parents=True)
        out = base / "parent-of-out" / "out" if locked != "out" else base / "out"
        if locked == "out":
            out.mkdir()
        target = base / locked
        target.chmod(0o500 if locked == "out" else 0o000)
        args = ["finetune", str(copy), "-o", str(out), *RUN]
        run = run_unprivileged(cli_command(args), cwd=base, env=nobody_env(base))
        assert run.returncode == 2, run.stderr[-3000:]
        line = one_error_line(run.stderr)
        assert str(target) in line and "permission" in line.lower(), line
        assert os.listdir(out) == []


@pytest.mark.slow
def test_a_full_disk_is_named_and_leaves_nothing_half_written(data):
    with public_dir() as base:
        out = base / "out"
        limit = 1_000_000  # bytes: the lock and a metrics line fit, no checkpoint does

        def full_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        run = subprocess.run(
            cli_command(["finetune", str(data), "-o", str(out), *RUN, "--epochs", "1"]),
            env=nobody_env(base),
            preexec_fn=full_disk,  # noqa: PLW1509 (no threads hold locks here)
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 1, run.stderr[-3000:]
        line = one_error_line(run.stderr)
        assert f"writing {out / BEST} failed" in line and "the disk is full" in line, line
        assert "start again" in line  # no epoch was saved: nothing to resume
        assert not out.exists() or extra_files(out) == [] and os.listdir(out) == [], os.listdir(out)


# -- 2. existing work is never overwritten or mixed ------------------------------------------------------


@pytest.mark.parametrize("marker", OUTPUTS)
def test_a_folder_holding_any_file_of_a_run_is_refused_without_resume(marker, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_bytes(b"the earlier run's")
    assert main(["finetune", str(data), "-o", str(out), *RUN, "--epochs", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out} already holds a run ({marker})" in line and "choose another folder" in line
    assert os.listdir(out) == [marker] and (out / marker).read_bytes() == b"the earlier run's"


# -- 3 + 2. interrupted runs: no debris, the same result on resume; one run per folder at once -----------------


def _start(data: Path, out: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(["finetune", str(data), "-o", str(out), *RUN, "--epochs", str(epochs)]),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(process: subprocess.Popen, what: str, condition, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.002)


def _any_exists(*paths: Path) -> bool:
    return any(path.exists() for path in paths)


def _staging(out: Path) -> bool:
    """``torch.save`` writing last.pth (about 180 MB): its hidden temporary file, still short of the whole."""
    try:
        return any(
            entry.name.startswith(f".{LAST}") and entry.stat().st_size < 100_000_000 for entry in os.scandir(out)
        )
    except FileNotFoundError:  # the file was renamed between the listing and its stat
        return False


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory) -> dict:
    """An uninterrupted 2-epoch run, and the same run stopped by SIGINT and by SIGTERM while torch.save
    wrote epoch 2's last.pth, then resumed; a second run tried while the first held its folder."""
    base = tmp_path_factory.mktemp("interrupted")
    reference = _start(data, base / "reference", 2)
    stopped, second = {}, None
    for name, sig in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)):
        out = base / name
        run = _start(data, out, 2)
        _wait_for(run, "the lock (or a first checkpoint)", partial(_any_exists, out / ".lock", out / LAST))
        if second is None:  # another run into the same folder while this one holds it (paused meanwhile)
            run.send_signal(signal.SIGSTOP)
            try:
                second = run_cli(["finetune", str(data), "-o", str(out), *RUN, "--epochs", "2"], base)
                second_resume = run_cli(["finetune", str(data), "-o", str(out), "--resume", "--workers", "0"], base)
            finally:
                run.send_signal(signal.SIGCONT)
            holder = run.pid
        _wait_for(run, "epoch 1's last.pth", partial(Path.exists, out / LAST))
        _wait_for(run, "epoch 2's last.pth being written", partial(_staging, out))
        run.send_signal(sig)
        _, stderr = run.communicate(timeout=120)
        left = extra_files(out)
        resumed = run_cli(["finetune", str(data), "-o", str(out), "--resume", "--workers", "0"], base)
        stopped[name] = {"status": run.returncode, "stderr": stderr, "left": left, "resumed": resumed, "out": out}
    stdout, stderr = reference.communicate(timeout=600)
    return {
        "reference": (reference.returncode, stderr, base / "reference"),
        "stopped": stopped,
        "second": second,
        "second_resume": second_resume,
        "holder": holder,
    }


def _metrics(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (out / METRICS).read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name, status", [("sigint", 130), ("sigterm", 128 + signal.SIGTERM)])
def test_an_interrupted_run_leaves_no_debris_and_resumes_to_the_same_result(interrupted, name, status):
    code, stderr, reference = interrupted["reference"]
    assert code == 0, stderr[-3000:]
    stopped = interrupted["stopped"][name]
    assert stopped["status"] == status, stopped["stderr"][-3000:]
    assert "Traceback" not in stopped["stderr"], stopped["stderr"][-3000:]
    assert stopped["left"] == [], stopped["left"]  # no staging file, no lock
    resumed = stopped["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(stopped["out"]) == _metrics(reference)
    for file in (BEST, LAST):
        a, b = (torch.load(folder / file, weights_only=True)["state_dict"] for folder in (reference, stopped["out"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    assert extra_files(stopped["out"]) == [] and (stopped["out"] / CURVES).is_file()


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(interrupted):
    for run in (interrupted["second"], interrupted["second_resume"]):
        assert run.returncode == 2, run.stderr[-3000:]
        line = one_error_line(run.stderr)
        assert f"pid {interrupted['holder']}" in line and "another finetune run" in line, line


def test_a_stop_signal_inside_torch_save_is_known_as_a_stop_not_a_write_error():
    """SIGTERM while torch.save blocks writing (a pipe nobody reads): torch reports a RuntimeError of its
    own, whose cause is the stop; the run must treat it as the stop (exit 143), not as a failed write."""
    read_end, write_end = os.pipe()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with sigterm_as_exit(), open(write_end, "wb") as pipe, pytest.raises(RuntimeError) as caught:
            timer.start()
            torch.save({"weights": torch.zeros(1_000_000)}, pipe)  # 4 MB: far more than a pipe holds
    finally:
        timer.cancel()
        os.close(read_end)
    stop = interruption(caught.value)
    assert isinstance(stop, SystemExit) and stop.code == 128 + signal.SIGTERM


def test_a_failed_write_of_the_curves_leaves_no_temporary_file(tmp_path):
    blocked = tmp_path / CURVES
    (blocked / "in-the-way").mkdir(parents=True)  # a folder where the PNG goes: the rename fails
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_top1": 50.0, "val_top1": 50.0, "val_top5": 100}]
    with pytest.raises(OSError):
        plot_curves(history, blocked)
    assert sorted(os.listdir(tmp_path)) == [CURVES]


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(finetuned, tmp_path):
    """SIGKILL runs no clean-up: the next run in the folder, which alone holds it, removes what is left."""
    out = link_run(finetuned["checkpoint"].parent, tmp_path / "out")
    for name in (f".{LAST}.4242.tmp", f".{CURVES}.4242.tmp.png"):
        (out / name).write_bytes(b"half a file")
    summary = finetune(finetuned["data"], out, resume=True, workers=0, device="cpu")
    assert summary["epochs"] == 1 and extra_files(out) == []


# -- 5. a saved state this code or model cannot continue --------------------------------------------------


def _other_shapes(saved: dict) -> None:
    first = next(iter(saved["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)


def _other_architecture(saved: dict) -> None:
    from tools.fake_checkpoints import random_state_dict

    saved["state_dict"] = random_state_dict("seresnext26t_32x4d", num_classes=3)


LIES = {
    "optimizer": (_other_shapes, "its optimizer state"),
    "scheduler": (lambda s: s["scheduler"].update(last_epoch=10**6), "its scheduler"),
    "epoch": (lambda s: s.update(epoch=5), "its epoch"),
    "classes": (lambda s: s.update(classes=["circle", "oval", "square"]), "was trained on the classes"),
    "architecture": (lambda s: s.update(architecture="seresnext50_32x4d"), "its architecture"),
    "weights": (_other_architecture, "holds the weights of seresnext26t_32x4d"),
    "settings": (lambda s: s["settings"].update(colour="red"), "its settings"),
    "rng": (lambda s: s["rng"].update(torch=torch.zeros(3)), "its rng"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_resume_state_that_does_not_fit_is_refused_by_field(lie, finetuned, tmp_path, capsys):
    out = link_run(finetuned["checkpoint"].parent, tmp_path / "out")
    saved = torch.load(out / LAST, weights_only=True)
    change, field = LIES[lie]
    change(saved)
    (out / LAST).unlink()  # a hard link: never write through it
    torch.save(saved, out / LAST)
    before = {name: (out / name).stat().st_mtime_ns for name in OUTPUTS}
    assert main(["finetune", str(finetuned["data"]), "-o", str(out), "--resume", "--workers", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert field in line and str(out / LAST) in line, line
    assert {name: (out / name).stat().st_mtime_ns for name in OUTPUTS} == before and extra_files(out) == []


def test_a_last_pth_that_is_no_checkpoint_is_refused_without_unsafe_advice(finetuned, tmp_path, capsys):
    out = link_run(finetuned["checkpoint"].parent, tmp_path / "out")
    (out / LAST).unlink()
    (out / LAST).write_bytes(b"<!DOCTYPE html><html>Sign in to continue</html>")
    assert main(["finetune", str(finetuned["data"]), "-o", str(out), "--resume", "--workers", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --resume: {out / LAST}") and "weights_only` set to `False`" not in line, line
    assert "arbitrary code" not in line and extra_files(out) == []


# -- 6. names: refused when not text, carried end to end when they are --------------------------------------


@pytest.mark.parametrize("name", [b"caf\xe9", b"two\nlines", b"esc\x1b[31m"], ids=["latin-1", "newline", "escape"])
def test_class_folders_whose_names_are_not_text_are_refused(name, tmp_path, capsys):
    root = write_shapes_dataset(tmp_path / "data", train=1, val=1, size=32)
    for split in ("train", "val"):
        os.rename(root / split / "circle", os.fsencode(root / split) + b"/" + name)
    assert main(["finetune", str(root), "-o", str(tmp_path / "out"), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    shown = name.decode("latin-1").replace("\n", "\\n").replace("\x1b", "\\u001b").replace("\xe9", "\\xe9")
    assert f"class folder {root}/train/{shown}" in line and "valid UTF-8 text on one line" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unusual_data_trains_and_its_names_reach_classify_and_evaluate(tmp_path, capsys):
    """Class names in several scripts; a corrupt image and an unreadable sub-folder are skipped: exit 1."""
    names = {"circle": "café", "square": "猫 cat", "triangle": "Ω-shape"}
    with public_dir() as base:
        root = write_shapes_dataset(base / "data", train=4, val=2, size=40, seed=4, colour_coded=True)
        for split in ("train", "val"):
            for shape, name in names.items():
                (root / split / shape).rename(root / split / name)
        (root / "train" / "café" / "broken.jpg").write_bytes(BROKEN)
        first = sorted((root / "train" / "猫 cat").iterdir())[0]
        hidden = root / "train" / "猫 cat" / "more"
        hidden.mkdir()
        shutil.copy(first, hidden / first.name)
        hidden.chmod(0o000)
        out = base / "out"
        args = ["finetune", str(root), "-o", str(out), *RUN, "--epochs", "1"]
        run = run_unprivileged(cli_command(args), cwd=base, env=nobody_env(base))
        assert run.returncode == 1, run.stderr[-3000:]
        summary = json.loads(run.stdout)
        assert summary["classes"] == sorted(names.values())
        assert summary["skipped_folders"] == [{"path": str(hidden), "reason": "Permission denied"}]
        assert [entry["input"] for entry in summary["skipped"]] == [str(root / "train" / "café" / "broken.jpg")]
        assert f"warning: folder {hidden} could not be read (Permission denied)" in run.stderr
        best = out / BEST
        assert torch.load(best, weights_only=True)["classes"] == sorted(names.values())
        photo = sorted((root / "val" / "猫 cat").iterdir())[0]
        args = ["--model", ARCH, "--checkpoint", str(best)]
        assert main(["classify", str(photo), *args, "--top-k", "3", "--format", "json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert {p["label"] for p in record["predictions"]} == set(names.values())
        assert main(["evaluate", str(root / "val"), *args, "--workers", "0"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["evaluated"] == 6 and summary["failed"] == 0


# -- under torchrun: one error, from rank 0 -----------------------------------------------------------------


@pytest.mark.slow
def test_under_torchrun_a_refusal_found_by_rank_0_alone_is_printed_once(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / METRICS).write_text("{}\n")  # only rank 0 looks at the output folder
    run = run_cli(["finetune", str(data), "-o", str(out), *RUN, "--epochs", "1"], tmp_path, nproc=2)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{out} already holds a run ({METRICS})" in errors[0], run.stderr[-3000:]
    assert not WORKER_FRAME.search(run.stderr), run.stderr[-3000:]  # torchrun's own report aside, no traceback
    assert os.listdir(out) == [METRICS]
