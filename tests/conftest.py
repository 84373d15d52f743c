"""Shared fixtures: NGC-layout checkpoint files, isolated caches (pyproject puts the repo root on the path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

IMAGES = ROOT / "assets" / "images"
RGB_PHOTOS = sorted(p for p in IMAGES.glob("*.jpg"))

# precision="auto" keeps its first faithful candidate instead of timing them (a second or two per model,
# and a choice file in the user's cache): every test process and the commands they start inherit this.
# tests/models/test_autotune.py turns it back on for the tests of that measurement.
os.environ["RESNEXT_HUB_AUTO_MEASURE"] = "0"


@pytest.fixture(scope="session")
def ngc_dir(tmp_path_factory) -> Path:
    """A folder holding both NGC checkpoint files (random weights, the real layout)."""
    from tools.fake_checkpoints import NGC_FILES, write_ngc_file

    folder = tmp_path_factory.mktemp("ngc")
    for architecture in NGC_FILES:
        write_ngc_file(folder, architecture)
    return folder


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A seresnext26d_32x4d checkpoint with random weights (timm's layout), for fast end-to-end tests."""
    import torch

    from tools.fake_checkpoints import random_state_dict

    path = tmp_path_factory.mktemp("small") / "seresnext26d_32x4d.pth"
    torch.save(random_state_dict("seresnext26d_32x4d", seed=5), path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache (TORCH_HOME), no weights mirror, an empty Hugging Face cache, online."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("RESNEXT_HUB_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))  # a user's own cache would serve files
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return home


@pytest.fixture(scope="session")
def triton_repo(small_checkpoint, tmp_path_factory) -> Path:
    """A Triton repository for seresnext26d_32x4d written by the command line, as a user would: the contract's
    two models (top-5) and the models they run, at the weights' crop size."""
    from resnext_hub import cli

    repo = tmp_path_factory.mktemp("repo")
    argv = ["export", "--model", "seresnext26d_32x4d", "--checkpoint", str(small_checkpoint), "--format", "triton"]
    argv += ["-o", str(repo), "--max-batch-size", "16", "--preferred-batch-sizes", "4,8", "--queue-delay-us", "500"]
    argv += ["--instance-kind", "cpu", "--instance-count", "2"]
    assert cli.main(argv) == 0
    return repo


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory) -> dict:
    """A fine-tuned seresnext26d_32x4d: ``finetune`` for 1 epoch from random weights at 32 px on a tiny shapes set.

    ``data`` (train/<shape>/, val/<shape>/), ``checkpoint`` (its best.pth, with the shapes' class names),
    ``classes`` (the class names) and ``architecture``. For the commands that take such a checkpoint.
    """
    from resnext_hub.training import finetune
    from tools.shapes_dataset import CLASSES, write_shapes_dataset

    base = tmp_path_factory.mktemp("finetuned")
    data = write_shapes_dataset(base / "data", train=8, val=4, size=40, seed=2, colour_coded=True)
    settings = {"model": "seresnext26d_32x4d", "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 1}
    finetune(data, base / "out", workers=0, device="cpu", **settings)
    return {
        "data": data,
        "checkpoint": base / "out" / "best.pth",
        "classes": CLASSES,
        "architecture": settings["model"],
    }


@pytest.fixture
def umask_022():
    """The process umask set to 022 (what a plain open() then gives: 0644) for the test."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def uploaded(path: Path) -> dict:
    """``path`` as the web demo's file value of an upload: copied into Gradio's upload folder (``GRADIO_TEMP_DIR``),
    the only place besides the sample photos that the demo reads."""
    import shutil
    import uuid

    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    shutil.copy(path, folder / path.name)
    return {"path": str(folder / path.name)}
