"""``evaluate`` on a small ImageNet-layout folder: exact counts, in one process and under torchrun.

The folder holds 12 photos (crops and flips of the shared ones) and one broken JPEG: 13 files,
which 2 processes cannot split evenly. Each photo's folder is chosen from a reference forward
pass of the same random-weight model, so the expected top-1/top-5 counts are known: a third
sit in their top-1 class, a third in their second-ranked class (top-5 only), a third far down.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RGB_PHOTOS, ROOT
from PIL import Image
from unprivileged import public_dir, run_unprivileged

from resnext_hub.cli import main
from resnext_hub.data import find_samples
from resnext_hub.distributed import shard_batches
from resnext_hub.evaluate import evaluate
from resnext_hub.models import build_model
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import imagenet_wnids, load_image

ARCH = "seresnext26d_32x4d"
BROKEN = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20  # a JPEG cut off in its header
TIMING_KEYS = {"seconds", "images_per_second", "world_size"}


# -- helpers shared with test_predict.py --------------------------------------------------------------


def write_checkpoint(folder: Path) -> Path:
    """Random weights with the statistics of a trained net (tests/checkpoints.py), in our own key layout."""
    from tools.fake_checkpoints import random_state_dict

    path = folder / f"{ARCH}.pth"
    torch.save(random_state_dict(ARCH), path)
    return path


def photo_variants() -> list[tuple[str, Image.Image]]:
    """12 small RGB photos: each shared JPEG at 160 px, mirrored, and cropped."""
    variants = []
    for path in RGB_PHOTOS[:4]:
        image = Image.open(path).convert("RGB")
        image.thumbnail((160, 160))
        w, h = image.size
        crop = image.crop((0, 0, 2 * w // 3, 2 * h // 3))
        variants += [
            (f"{path.stem}_full", image),
            (f"{path.stem}_mirror", image.transpose(0)),
            (f"{path.stem}_crop", crop),
        ]
    return variants


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env() -> dict[str, str]:
    """One thread per process (as torchrun sets), the repo importable, gloo on the loopback interface."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RESNEXT_HUB_WEIGHTS_MIRROR", None)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def cli_command(args: list[str], nproc: int = 1) -> list[str]:
    """``python -m resnext_hub ARGS``, or the same under ``torchrun --nproc_per_node=nproc`` on 127.0.0.1."""
    if nproc == 1:
        return [sys.executable, "-m", "resnext_hub", *args]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1"]
    return [sys.executable, *launcher, "--master_port", str(free_port()), "-m", "resnext_hub", *args]


def run_cli(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args, nproc), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=240)


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """The folder, the checkpoint, and the counts a correct evaluation must find."""
    base = tmp_path_factory.mktemp("imagenet_val")
    checkpoint = write_checkpoint(base)
    model = build_model(ARCH, pretrained_from_file=checkpoint)
    flat = base / "flat"
    flat.mkdir()
    paths = []
    for name, image in photo_variants():
        image.save(flat / f"{name}.jpg", quality=90)
        paths.append(flat / f"{name}.jpg")
    transform = model.preprocessing
    with torch.inference_mode():
        logits = model(torch.stack([transform(load_image(p)) for p in paths]))
    order = logits.argsort(dim=1, descending=True)
    wnids, root, targets = imagenet_wnids(), base / "val", []
    for i, path in enumerate(paths):
        target = int(order[i, (0, 1, 500)[i % 3]])  # top-1 hit, top-5 hit only, miss
        folder = root / wnids[target]
        folder.mkdir(parents=True, exist_ok=True)
        path.rename(folder / path.name)
        targets.append(target)
    (root / wnids[targets[0]] / "broken.jpg").write_bytes(BROKEN)
    (root / wnids[targets[0]] / "notes.txt").write_text("not an image: not counted\n")
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets)).item()
    return {"root": root, "checkpoint": checkpoint, "model": model, "loss": loss, "base": base}


@pytest.fixture(scope="module")
def single(dataset) -> dict:
    """The CLI in one plain process (no torchrun): its summary file, stdout and stderr."""
    out, report = dataset["base"] / "single.json", dataset["base"] / "single_report"
    args = ["evaluate", str(dataset["root"]), "--model", ARCH, "--checkpoint", str(dataset["checkpoint"])]
    args += ["--report", str(report)]
    run = run_cli(
        [*args, "--batch-size", "4", "--workers", "2", "--precision", "fp32", "-o", str(out)], dataset["base"]
    )
    return {"run": run, "summary": json.loads(out.read_text()) if out.exists() else None, "report": report}


# -- tests ----------------------------------------------------------------------------------------------


def test_shards_cover_every_index_once_in_the_same_batches():
    for count in range(0, 23):
        for batch_size in (1, 3, 4):
            alone = [list(b) for b in shard_batches(count, batch_size)]
            for world in (2, 3, 5):
                shards = [[list(b) for b in shard_batches(count, batch_size, r, world)] for r in range(world)]
                indices = sorted(i for shard in shards for batch in shard for i in batch)
                assert indices == list(range(count))
                assert sorted(batch for shard in shards for batch in shard) == sorted(alone)


def test_a_folder_that_is_no_class_of_the_model_is_refused(dataset, tmp_path, capsys):
    (tmp_path / imagenet_wnids()[1]).mkdir()
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    with pytest.raises(ValueError, match=r"1 folder\(s\) match none of the model's 1000 classes: 'cats'.*WordNet id"):
        find_samples(tmp_path)
    # The CLI says so once, with the usage exit status, and how to fix it.
    args = ["evaluate", str(tmp_path), "--model", ARCH, "--checkpoint", str(dataset["checkpoint"]), "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("'cats'") == 1 and "'tench, Tinca tinca'" in err and "--checkpoint" in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_folder_without_class_folders_is_refused_before_the_model_loads(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # an image, but no class folder
    assert main(["evaluate", str(tmp_path), "--model", ARCH, "--checkpoint", "/nonexistent.pth"]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and "<class>/" in err and "nonexistent" not in err


@pytest.mark.slow
def test_one_process_counts_every_image_once_and_scores_it_right(dataset, single):
    run, summary = single["run"], single["summary"]
    assert run.returncode == 1, run.stderr  # 1: one file could not be read
    assert json.loads(run.stdout) == summary  # printed and written: the same summary
    assert summary["images"] == 13 and summary["evaluated"] == 12 and summary["failed"] == 1
    assert summary["correct_top1"] == 4 and summary["correct_top5"] == 8
    assert summary["top1"] == pytest.approx(100 * 4 / 12) and summary["top5"] == pytest.approx(100 * 8 / 12)
    assert summary["loss"] == pytest.approx(dataset["loss"], rel=1e-4)
    [failure] = summary["failures"]
    assert failure["input"].endswith("broken.jpg") and failure["error"]
    assert summary["world_size"] == 1 and summary["precision"] == "fp32" and summary["images_per_second"] > 0
    assert summary["model"] == ARCH and summary["preprocessing"]["interpolation"] == "bicubic"  # timm's weights
    report = json.loads((single["report"] / "report.json").read_text())
    assert sum(c["images"] for c in report["per_class"]) == 12 and report["top1"] == summary["top1"]
    assert sum(c["correct_top1"] for c in report["per_class"]) == 4
    assert report["calibration"]["nll"] == pytest.approx(dataset["loss"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_give_identical_counts_and_accuracy(dataset, single):
    out, report = dataset["base"] / "two.json", dataset["base"] / "two_report"
    args = ["evaluate", str(dataset["root"]), "--model", ARCH, "--checkpoint", str(dataset["checkpoint"])]
    args += ["--report", str(report)]
    run = run_cli(
        [*args, "--batch-size", "4", "--workers", "1", "--precision", "fp32", "-o", str(out)], dataset["base"], nproc=2
    )
    assert out.exists(), run.stderr[-3000:]
    two, one = json.loads(out.read_text()), single["summary"]
    assert two["world_size"] == 2
    assert {k: v for k, v in two.items() if k not in TIMING_KEYS | {"loss"}} == {
        k: v for k, v in one.items() if k not in TIMING_KEYS | {"loss"}
    }
    assert math.isclose(two["loss"], one["loss"], rel_tol=1e-12)  # summed in another order
    # Only rank 0 printed: one summary on stdout, one result line on stderr.
    assert json.loads(run.stdout) == two
    assert run.stderr.count("top-1 33.333%") == 1 and run.stderr.count("broken.jpg: ERROR") == 1
    # The report (issue 23): written once, by rank 0, with the same numbers as in one process.
    assert run.stderr.count("report: ") == 1 and (report / "confusion_matrix.png").is_file()
    two_report = json.loads((report / "report.json").read_text())
    one_report = json.loads((single["report"] / "report.json").read_text())
    assert two_report.pop("loss") == pytest.approx(one_report.pop("loss"), rel=1e-12)
    assert two_report == one_report  # counts, confusion matrix, temperature and ECE: computed in dataset order


@pytest.mark.slow
def test_api_with_loader_workers_and_the_fast_path(dataset):
    summary = evaluate(dataset["model"], dataset["root"], InferenceOptions(device="cpu", batch_size=5, workers=2))
    assert summary["evaluated"] + summary["failed"] == summary["images"] == 13
    assert summary["failed"] == 1 and summary["world_size"] == 1
    expected = {"fp32", "bf16"} if hasattr(dataset["model"], "optimize_for_inference") else {"fp32"}
    assert summary["precision"] in expected
    if summary["precision"] == "fp32":
        assert (summary["correct_top1"], summary["correct_top5"]) == (4, 8)
    else:  # bf16 may move a borderline rank of this random-weight model; its fidelity is tested with the model
        assert 0 <= summary["correct_top1"] <= summary["correct_top5"] <= 12


# -- issue 13: the summary survives its output; unreadable folders; any exception per image ---------------------


def test_an_unwritable_output_fails_before_the_model_loads(dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = ["evaluate", str(dataset["root"]), "--model", ARCH, "--checkpoint", "/nonexistent.pth"]
    status = main([*args, "-o", str(tmp_path / "file" / "summary.json")])  # in this process: a check before loading
    stderr = capsys.readouterr().err
    assert status == 2 and stderr.startswith("error: --output") and "checkpoint" not in stderr


@pytest.mark.slow
def test_an_output_that_fails_while_written_leaves_the_summary_on_stdout(dataset, capsys):
    args = ["evaluate", str(dataset["root"]), "--model", ARCH, "--checkpoint", str(dataset["checkpoint"])]
    # In this process: stdout and the failed write are the command's, not the interpreter's.
    status = main([*args, "--batch-size", "13", "--workers", "0", "--precision", "fp32", "-o", "/dev/full"])
    out, err = capsys.readouterr()
    assert status == 1, err
    summary = json.loads(out)
    assert summary["images"] == 13 and summary["correct_top1"] == 4 and summary["skipped"] == []
    assert "error: writing /dev/full failed (No space left on device); the summary is on stdout above" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_class_folder_that_cannot_be_read_is_reported_and_fails_the_run(dataset):
    with public_dir() as base:
        root = base / "val"
        shutil.copytree(dataset["root"], root)
        locked = sorted(root.iterdir())[-1]
        locked.chmod(0o000)
        checkpoint = base / f"{ARCH}.pth"
        shutil.copy(dataset["checkpoint"], checkpoint)
        args = [
            "evaluate",
            str(root),
            "--model",
            ARCH,
            "--checkpoint",
            str(checkpoint),
            "--workers",
            "0",
            "--precision",
            "fp32",
        ]
        run = run_unprivileged(cli_command(args), cwd=base, env={**cli_env(), "HOME": str(base)})
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    assert summary["skipped"] == [{"path": str(locked), "reason": "Permission denied"}]
    assert summary["evaluated"] + summary["failed"] == summary["images"] < 13
    assert f"warning: folder {locked} could not be read (Permission denied)" in run.stderr
    assert "the numbers are of the" in run.stderr


@pytest.mark.slow
def test_images_whose_loading_raises_anything_are_counted_as_failures(dataset, tmp_path):
    # A dataset folder given as "~no-such-user-h13": the loader expands "~user", and pathlib raises RuntimeError.
    shutil.copytree(dataset["root"], tmp_path / "~no-such-user-h13")
    args = ["evaluate", "~no-such-user-h13", "--model", ARCH, "--checkpoint", str(dataset["checkpoint"])]
    run = run_cli([*args, "--workers", "1"], tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    summary = json.loads(run.stdout)
    assert summary["failed"] == 13 and summary["evaluated"] == 0 and summary["top1"] is None
    assert {f["error"] for f in summary["failures"]} == {"RuntimeError: Could not determine home directory."}


# -- issue 19: a model with its own classes ------------------------------------------------------------------


def test_a_finetuned_model_scores_its_own_val_folder_as_classify_ranks_it(finetuned, capsys):
    val, model = finetuned["data"] / "val", ["--model", finetuned["architecture"]]
    common = [*model, "--checkpoint", str(finetuned["checkpoint"]), "--precision", "fp32", "--batch-size", "4"]
    assert main(["evaluate", str(val), *common, "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["classify", str(val), *common, "--format", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == summary["images"] == summary["evaluated"] == 3 * 4 and summary["precision"] == "fp32"
    assert {p["label"] for r in records for p in r["predictions"]} == set(finetuned["classes"])
    top1 = sum(r["predictions"][0]["label"] == Path(r["input"]).parent.name for r in records)
    assert summary["correct_top1"] == top1 and summary["top1"] == pytest.approx(100 * top1 / 12)
    assert summary["correct_top5"] == 12  # 3 classes: the "top-5" is all of them


def test_a_subset_of_the_classes_in_another_letter_case_is_scored_against_the_models_outputs(finetuned, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(finetuned["data"] / "val" / "triangle", val / "Triangle")
    model = build_model(ARCH, pretrained_from_file=finetuned["checkpoint"])
    summary = evaluate(model, val, InferenceOptions(device="cpu", precision="fp32", workers=0, batch_size=4))
    paths = sorted((val / "Triangle").iterdir())
    with torch.inference_mode():
        logits = model(torch.stack([model.preprocessing(load_image(p)) for p in paths]))
    target = torch.full((len(paths),), finetuned["classes"].index("triangle"))
    assert summary["images"] == summary["evaluated"] == len(paths) == 4
    assert summary["correct_top1"] == int((logits.argmax(1) == target).sum())
    assert summary["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-4)
