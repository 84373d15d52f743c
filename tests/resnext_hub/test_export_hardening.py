"""``export`` as a careless user, a full disk or a stopped job meets it (issue 20).

The rule: a file-system fault is one ``error:`` line that names the path and the way out, with a
nonzero exit status and no traceback (a full disk says the disk is full); nothing is replaced
without ``--overwrite``, and with it only once the new output is verified; the export's own input
is never replaced; an interrupted export (Ctrl-C, SIGTERM) leaves no staged file and the old output
whole. Exports run at 64 px of the small model.

Tests run as root, whom no permission bit stops: permission cases run as ``nobody``
(tests/unprivileged.py). A full disk is a child process with a file-size limit (RLIMIT_FSIZE,
SIGXFSZ ignored): writes past it fail with EFBIG, as writes to a full disk fail with ENOSPC.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from unprivileged import public_dir, run_unprivileged

from resnext_hub import cli, exit_codes
from resnext_hub.export import ExportError, export_onnx, export_torchscript
from resnext_hub.models import build_model
from resnext_hub.triton.repository import model_folders

ARCH = "seresnext26d_32x4d"
EXPORT = [sys.executable, "-m", "resnext_hub", "export", "--model", ARCH, "--image-size", "64"]
FULL_AT = 1 << 20  # bytes a child may write to one file: the small model exported is ~67 MB


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every name in ``folder``, hidden ones too (staging folders are hidden)."""
    return sorted(os.listdir(folder))


def _contents(folder: Path) -> dict[Path, bytes]:
    """Every file below ``folder`` and its bytes."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _error_line(stderr: str) -> str:
    """The one error line (``error: ...`` or argparse's ``prog: error: ...``) of a run without a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def _limited(max_file_bytes: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return limit


@pytest.fixture
def checkpoint(small_checkpoint, tmp_path) -> Path:
    """A copy of the small checkpoint: a test that fails on a careless export must not damage the shared one."""
    return Path(shutil.copy(small_checkpoint, tmp_path / "weights.pth"))


@pytest.mark.slow  # an export process per case, as user nobody
def test_file_system_faults_found_up_front_are_one_error_line_naming_the_path(small_checkpoint, tmp_path, capsys):
    with public_dir() as base:
        readable = Path(shutil.copy(small_checkpoint, base / "weights.pth"))
        readable.chmod(0o644)
        secret = Path(shutil.copy(small_checkpoint, base / "secret.pth"))
        secret.chmod(0o600)  # root's: nobody may not read it
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # root's: nobody may not create anything in it
        (locked / "other_model").mkdir()
        as_nobody = {
            "an unreadable checkpoint": (["--checkpoint", str(secret), "--format", "onnx", "-o", str(base / "m.onnx")],
                                         [str(secret), "permission denied", "readable"]),
            "a read-only folder for a file": (["--format", "onnx", "-o", str(locked / "m.onnx")],
                                              [str(locked), "no permission"]),
            "a read-only model repository": (["--format", "triton", "--no-image-ensemble", "-o", str(locked)],
                                             [str(locked), "no permission"]),
        }  # fmt: skip
        problems = []
        for case, (argv, expected) in as_nobody.items():
            weights = [] if "--checkpoint" in argv else ["--checkpoint", str(readable)]
            result = run_unprivileged([*EXPORT, *weights, *argv], cwd=ROOT)
            try:
                assert result.returncode != 0
                line = _error_line(result.stderr)
                assert all(text in line for text in expected), line
            except AssertionError as failure:
                problems.append(f"{case}: {failure}\n{result.stderr[-1500:]}")
        assert _listing(base) == ["locked", "secret.pth", "weights.pth"]
        assert _listing(locked) == ["other_model"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    not_folders = {
        "a file as a file's folder": ["--format", "onnx", "-o", str(a_file / "m.onnx")],
        "a file as a repository": ["--format", "triton", "-o", str(a_file)],
        "a file as a repository's folder": ["--format", "triton", "-o", str(a_file / "repository")],
    }
    for case, argv in not_folders.items():
        status = cli.main(["export", "--model", ARCH, "--checkpoint", str(small_checkpoint), *argv])
        stderr = capsys.readouterr().err
        try:
            assert status == 2
            line = _error_line(stderr)
            assert str(a_file) in line and "not a folder" in line, line
        except AssertionError as failure:
            problems.append(f"{case}: {failure}\n{stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_that_says_so_and_leaves_the_old_file_and_nothing_else(checkpoint, tmp_path):
    problems = []
    for form, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        folder = tmp_path / form
        folder.mkdir()
        old = folder / name
        old.write_bytes(b"the previous export")
        argv = [*EXPORT, "--checkpoint", str(checkpoint), "--format", form, "-o", str(old), "--overwrite"]
        result = subprocess.run(argv, cwd=ROOT, preexec_fn=_limited(FULL_AT), capture_output=True, text=True)
        try:
            assert result.returncode == 1, result.returncode
            line = _error_line(result.stderr)
            assert str(old) in line and "disk is full" in line, line
            assert old.read_bytes() == b"the previous export"
            assert _listing(folder) == [name]  # no staged file
        except AssertionError as failure:
            problems.append(f"{form}: {failure}\n{result.stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_an_existing_output_is_replaced_only_with_overwrite_and_only_by_a_verified_export(checkpoint, tmp_path, capsys):
    argv = ["export", "--model", ARCH, "--checkpoint", str(checkpoint), "--image-size", "64"]
    problems = []
    for form, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("pt2", "m.pt2")):
        old = tmp_path / name
        old.write_bytes(b"the previous export")
        status = cli.main([*argv, "--format", form, "-o", str(old)])
        stderr = capsys.readouterr().err
        try:
            assert status == 2, status  # refused before the model loads
            line = _error_line(stderr)
            assert str(old) in line and "--overwrite" in line, line
            assert old.read_bytes() == b"the previous export"
        except AssertionError as failure:
            problems.append(f"{form} without --overwrite: {failure}\n{stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
    assert cli.main([*argv, "--format", "torchscript", "-o", str(tmp_path / "m.pt"), "--overwrite"]) == 0
    assert torch.jit.load(str(tmp_path / "m.pt"))(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    # The library's exporters refuse an existing file the same way, and replace one only with a verified export.
    model = build_model(ARCH, pretrained_from_file=checkpoint)
    before = _digest(tmp_path / "m.pt")
    with pytest.raises(ExportError, match="already exists: pass overwrite=True"):
        export_onnx(model, tmp_path / "m.onnx", image_size=64)
    with pytest.raises(ExportError, match="does not match the eager model"):
        export_torchscript(_BatchTwoOnly(), tmp_path / "m.pt", image_size=64, overwrite=True)
    assert _digest(tmp_path / "m.pt") == before and (tmp_path / "m.onnx").read_bytes() == b"the previous export"
    assert _listing(tmp_path) == ["m.onnx", "m.pt", "m.pt2", "weights.pth"]


class _BatchTwoOnly(torch.nn.Module):
    """Right only at the traced batch size: an export that fails its verification."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.mean((2, 3)).repeat(1, 4)
        return scores * 2 if x.shape[0] == 2 else scores


def test_export_never_writes_over_its_own_input(checkpoint, tmp_path, capsys):
    before = _digest(checkpoint)
    symbolic = tmp_path / "symbolic.pth"
    symbolic.symlink_to(checkpoint)
    hard = tmp_path / "hard.pth"
    os.link(checkpoint, hard)
    repository = tmp_path / "repository"
    (repository / ARCH).mkdir(parents=True)
    inside = Path(shutil.copy(checkpoint, repository / ARCH / "weights.pth"))
    cases = {
        "the checkpoint itself": (checkpoint, ["--format", "torchscript", "-o", str(checkpoint)]),
        "a symbolic link to it": (checkpoint, ["--format", "torchscript", "-o", str(symbolic)]),
        "a hard link to it": (checkpoint, ["--format", "onnx", "-o", str(hard)]),
        "the model folder holding it": (inside, ["--format", "triton", "--no-image-ensemble", "-o", str(repository)]),
    }
    problems = []
    for case, (weights, argv) in cases.items():
        status = cli.main(["export", "--model", ARCH, "--checkpoint", str(weights), "--overwrite", *argv])
        stderr = capsys.readouterr().err
        try:
            assert status == 2, status
            line = _error_line(stderr)
            assert "--checkpoint" in line and "input" in line, line
        except AssertionError as failure:
            problems.append(f"{case}: {failure}\n{stderr[-1500:]}")
    assert _digest(checkpoint) == _digest(hard) == _digest(inside) == before and symbolic.is_symlink()
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
def test_a_triton_repository_keeps_its_other_models_and_ours_is_replaced_only_with_overwrite(
    checkpoint, tmp_path, capsys
):
    repository = tmp_path / "repository"
    (repository / "other_model" / "1").mkdir(parents=True)
    (repository / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    (repository / "other_model" / "1" / "model.onnx").write_bytes(b"someone else's model")
    (repository / ARCH).mkdir()
    (repository / ARCH / "config.pbtxt").write_text("the previous export\n")
    others = _contents(repository / "other_model")
    argv = ["export", "--model", ARCH, "--checkpoint", str(checkpoint), "--image-size", "64", "--format", "triton"]
    argv += ["--no-image-ensemble", "-o", str(repository)]
    assert cli.main(argv) == 2  # refused before the model loads
    line = _error_line(capsys.readouterr().err)
    assert str(repository / ARCH) in line and "--overwrite" in line, line
    assert (repository / ARCH / "config.pbtxt").read_text() == "the previous export\n"

    assert cli.main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    # The contract's models (no staging folder left among them), the other model untouched.
    assert _listing(repository) == sorted(["other_model", *model_folders(ARCH, image_ensemble=False)])
    assert sorted(p.name for p in (repository / ARCH).iterdir()) == ["1", "config.pbtxt"]  # the ensemble
    assert (repository / ARCH / "config.pbtxt").read_text().startswith(f'name: "{ARCH}"')
    assert _contents(repository / "other_model") == others


def _wait_for_staging(process: subprocess.Popen, folder: Path, timeout_s: float = 300) -> None:
    """Until the export has begun writing: its staging folder (hidden, ``.tmp``) is in ``folder``."""
    deadline = time.monotonic() + timeout_s
    while not any(name.startswith(".") and name.endswith(".tmp") for name in os.listdir(folder)):
        assert process.poll() is None, f"the export ended first:\n{process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no staging folder appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_debris_and_the_old_output_whole(checkpoint, tmp_path):
    # Ctrl-C exits 130 (128 + SIGINT), SIGTERM 143 (128 + SIGTERM); both clean up the same way.
    repository = tmp_path / "repository"
    (repository / "other_model").mkdir(parents=True)
    (repository / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    (repository / ARCH).mkdir()
    (repository / ARCH / "config.pbtxt").write_text("the previous export\n")
    files = tmp_path / "files"
    files.mkdir()
    (files / "m.onnx").write_bytes(b"the previous export")
    (files / "m.pt").write_bytes(b"the previous export")
    cases = [
        ("onnx", files / "m.onnx", signal.SIGTERM, exit_codes.TERMINATED),
        ("torchscript", files / "m.pt", signal.SIGINT, exit_codes.INTERRUPTED),
        ("triton", repository, signal.SIGTERM, exit_codes.TERMINATED),
    ]
    before = {folder: _contents(folder) for folder in (files, repository)}
    problems = []
    for form, output, signum, status in cases:
        argv = [*EXPORT, "--checkpoint", str(checkpoint), "--format", form, "-o", str(output), "--overwrite"]
        argv += ["--no-image-ensemble"] if form == "triton" else []
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_staging(process, output if output.is_dir() else output.parent)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
            process.wait()
        try:
            assert process.returncode == status, process.returncode
            assert "Traceback" not in stderr
            assert _listing(files) == ["m.onnx", "m.pt"] and _listing(repository) == ["other_model", ARCH]
            for folder, contents in before.items():
                assert _contents(folder) == contents, folder
        except AssertionError as failure:
            problems.append(f"{form}, {signal.Signals(signum).name}: {failure}\n{stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
