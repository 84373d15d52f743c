"""``finetune``: it learns, resumes a killed run exactly, hands its classes to the hub, runs in 2 processes.

The set is ``tools.shapes_dataset``'s colour-coded variant at 40 px (each shape in its class's
colour: learned from random weights in a few dozen steps; the shape-only set needs a few hundred,
see ``benchmarks.finetune_shapes``), with one corrupt JPEG among the training files; runs start
from random weights at 32 px. Three runs share the module: a reference run, the same run killed
after its first epoch and resumed (both started at once, one core each), and a 2-process run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_evaluate import BROKEN, cli_command, cli_env, run_cli

from resnext_hub.cli import main
from resnext_hub.distributed import DistContext
from resnext_hub.processing import ImageClassification, nvidia_convnets_processing_utils, prepare_batch, top_k
from resnext_hub.training import finetune
from resnext_hub.training.data import epoch_batches, scaled_preset
from tools.shapes_dataset import CLASSES, write_shapes_dataset

ARCH = "seresnext26d_32x4d"
EPOCHS = 4
RUN = ["--model", ARCH, "--no-pretrained", "--image-size", "32", "--batch-size", "12", "--lr", "2e-3"]
RUN += ["--epochs", str(EPOCHS), "--workers", "1", "--no-progress"]
TIMING = {"images_per_second", "train_seconds"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=24, val=12, size=40, seed=1, colour_coded=True)
    (root / "train" / "circle" / "broken.jpg").write_bytes(BROKEN)
    return root


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory) -> dict:
    """Reference, killed + resumed, and 2-process runs: their output folders and completed processes."""
    base = tmp_path_factory.mktemp("runs")
    start = [*cli_command(["finetune", str(shapes), *RUN, "-o", str(base / "ref")])]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    reference = subprocess.Popen(start, cwd=base, env=cli_env(), **pipes)
    killed_out = base / "resumed"
    killed = subprocess.Popen(
        cli_command(["finetune", str(shapes), *RUN, "-o", str(killed_out)]),
        cwd=base,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (killed_out / "last.pth").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # no clean-up at all: what a lost machine leaves
    killed.wait()
    killed_after = len(metrics(killed_out)) if (killed_out / "metrics.jsonl").exists() else 0
    resumed = run_cli(["finetune", str(shapes), "-o", str(killed_out), "--resume", "--workers", "0"], base)
    stdout, stderr = reference.communicate(timeout=240)
    reference = subprocess.CompletedProcess(start, reference.returncode, stdout, stderr)
    two = run_cli(["finetune", str(shapes), *RUN, "-o", str(base / "two")], base, nproc=2)
    return {"base": base, "reference": reference, "resumed": resumed, "killed_after": killed_after, "two": two}


# -- learning, outputs, bad data -------------------------------------------------------------------


@pytest.mark.slow  # the subprocess and torchrun runs of the module
def test_a_short_run_learns_shapes_and_skips_the_corrupt_file(runs, shapes):
    run, out = runs["reference"], runs["base"] / "ref"
    assert run.returncode == 1, run.stderr[-3000:]  # trained, but an image was skipped (README's rule)
    summary = json.loads(run.stdout)
    history = metrics(out)
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_second", "lr"} <= history[
        0
    ].keys()
    assert history[-1]["val_top1"] >= 80, history  # chance is 33.3%
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert summary["best_val_top1"] == max(r["val_top1"] for r in history)
    # The corrupt JPEG is named once, with its reason, and not trained on.
    assert run.stderr.count("broken.jpg") == 1 and "skipped unreadable image" in run.stderr
    assert summary["skipped"][0]["input"].endswith("broken.jpg") and summary["train_images"] == 3 * 24
    assert "1 unreadable image(s) skipped" in run.stderr and "Traceback" not in run.stderr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["classes"] == list(CLASSES) and best["architecture"] == ARCH
    assert best["preprocessing"]["crop_size"] == 32 and best["preprocessing"]["interpolation"] == "bicubic"
    last = torch.load(out / "last.pth", weights_only=True)
    assert "optimizer" not in best and {"optimizer", "scheduler", "rng", "settings", "history"} <= last.keys()


@pytest.mark.slow  # the subprocess and torchrun runs of the module
def test_a_killed_run_resumes_to_the_same_weights_and_metrics(runs):
    assert runs["resumed"].returncode == 1, runs["resumed"].stderr[-3000:]  # the corrupt JPEG, skipped again
    assert runs["killed_after"] < EPOCHS, "the run finished before it was killed"
    assert "resuming" in runs["resumed"].stderr
    ref, resumed = runs["base"] / "ref", runs["base"] / "resumed"
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(ref)]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(resumed)] == strip
    for name in ("last.pth", "best.pth"):
        a, b = (torch.load(folder / name, weights_only=True)["state_dict"] for folder in (ref, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # the subprocess and torchrun runs of the module
def test_the_checkpoint_comes_back_through_the_hub_with_the_users_labels(runs, shapes, capsys):
    best = runs["base"] / "ref" / "best.pth"
    model = torch.hub.load(str(ROOT), ARCH, source="local", pretrained_from_file=str(best))
    assert model.num_classes == 3 and model.classes.names == CLASSES
    assert model.preprocessing.crop_size == 32
    images = sorted((shapes / "val" / "triangle").iterdir())[:2]
    with torch.no_grad():
        logits = model(prepare_batch(images, preprocessing=model))
    assert {p.label for p in top_k(logits, 3, logits=True, labels=model.classes)[0]} == set(CLASSES)
    nvidia_convnets_processing_utils(preprocessing=model).pick_n_best(logits.softmax(1), n=2)
    assert capsys.readouterr().out.count("sample ") == 2
    assert main(["classify", str(images[0]), "--model", ARCH, "--checkpoint", str(best), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in CLASSES) and "tench" not in printed


@pytest.mark.slow  # the subprocess and torchrun runs of the module
def test_two_processes_train_to_a_comparable_result(runs):
    run, out = runs["two"], runs["base"] / "two"
    assert run.returncode == 1, run.stderr[-3000:]  # rank 0's status: the corrupt JPEG was skipped
    summary = json.loads(run.stdout)  # only rank 0 printed
    assert summary["world_size"] == 2 and summary["train_images"] == 3 * 24
    history = metrics(out)
    assert len(history) == EPOCHS and history[-1]["val_top1"] >= 80, history
    assert run.stderr.count("broken.jpg") == 1


# -- the boundary ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--image-size", "16"], "--image-size must be at least 32"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--warmup", "1"], "--warmup is a fraction"),
        (["--pretrained-from-file", "/nonexistent.pth"], "does not exist"),
        (["--resume"], "no run to continue"),
    ],
)
def test_bad_options_exit_2_with_one_line(shapes, tmp_path, capsys, options, message):
    assert main(["finetune", str(shapes), "-o", str(tmp_path / "out"), "--model", ARCH, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _status(argv: list[str]) -> int | str | None:
    """The exit status of the CLI: returned (our checks) or raised (argparse's own)."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_argparse_refusals_exit_2(shapes, tmp_path):
    for options in (
        ["--no-pretrained", "--pretrained-from-file", "x.pth"],
        ["--model", "resnet9"],
        ["--workers", "-1"],
    ):
        assert _status(["finetune", str(shapes), "-o", str(tmp_path), *options]) == 2


def test_bad_data_layouts_are_refused_clearly(tmp_path, capsys):
    root = write_shapes_dataset(tmp_path / "data", train=1, val=1, size=32)
    (root / "val" / "square").rename(root / "val" / "squares")
    assert main(["finetune", str(root), "-o", str(tmp_path / "out"), "--model", ARCH]) == 2
    assert "only in train/: ['square'], only in val/: ['squares']" in capsys.readouterr().err
    (root / "val" / "squares").rename(root / "val" / "square")
    for path in (root / "train" / "circle").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="train/circle holds no images"):
        finetune(root, tmp_path / "out", model=ARCH)
    with pytest.raises(ValueError, match="needs train/<class>/ and val/<class>/"):
        finetune(root / "train", tmp_path / "out", model=ARCH)


@pytest.mark.slow  # the subprocess and torchrun runs of the module
def test_a_global_batch_must_split_evenly_and_a_resume_must_match(runs, shapes, tmp_path):
    with pytest.raises(ValueError, match="batch_size 9 .global. is not divisible by the 2 processes"):
        finetune(shapes, tmp_path / "out", model=ARCH, batch_size=9, ctx=DistContext(world_size=2))
    done = runs["base"] / "ref"
    with pytest.raises(ValueError, match=r"already holds a run"):
        finetune(shapes, done, model=ARCH)
    with pytest.raises(ValueError, match=r"other settings: batch_size=16 \(the run has 12\)"):
        finetune(shapes, done, resume=True, batch_size=16)
    with pytest.raises(ValueError, match="other settings: model='seresnext50_32x4d'"):
        finetune(shapes, done, resume=True, model="seresnext50_32x4d")


# -- the pieces --------------------------------------------------------------------------------------


def test_epoch_batches_split_one_shuffle_over_the_ranks():
    one = [i for batch in epoch_batches(50, 10, DistContext(), seed=3, epoch=2) for i in batch]
    two = [epoch_batches(50, 5, DistContext(rank=r, world_size=2), seed=3, epoch=2) for r in range(2)]
    assert len(one) == 50 and sorted(one) == list(range(50))
    assert sorted(i for rank in two for batch in rank for i in batch) == list(range(50))
    assert len(two[0]) == len(two[1]) == 5
    assert epoch_batches(50, 10, DistContext(), seed=3, epoch=3) != epoch_batches(50, 10, DistContext(), 3, 2)


def test_the_preset_scales_with_the_image_size():
    timm = ImageClassification(256, 224, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    small = scaled_preset(timm, 64)
    assert (small.resize_size, small.crop_size, small.interpolation, small.mean) == (73, 64, "bicubic", timm.mean)
