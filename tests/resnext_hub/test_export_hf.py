"""``export --format hf``: a folder that the installed timm loads (``local-dir:``) with our logits, class names and
preprocessing, and that our own doors (``--checkpoint FOLDER``, ``pretrained_from_file=FOLDER``) read back."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import timm
import timm.data
import torch
from conftest import IMAGES
from safetensors.torch import save

import hubconf
from resnext_hub import cli
from resnext_hub.export import ExportError, export_hf
from resnext_hub.export.hf_folder import model_card, timm_config
from resnext_hub.models import CheckpointError, build_model
from resnext_hub.models.hf_config import preset_of
from resnext_hub.processing.labels import imagenet_classes
from resnext_hub.processing.presets import as_preset
from tools.fake_checkpoints import random_state_dict

TOLERANCE = 1e-4
SIZE = 64


def _timm_model(folder) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, seed: int = 0) -> tuple[float, float]:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected, got = ours(x), theirs(x)
    return float((expected - got).abs().max()), float(expected.std())


def _data_config(model: torch.nn.Module) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in timm.data.resolve_model_data_config(model).items()}


@pytest.mark.slow  # timm and our model side by side, and the command line's export
def test_family_weights_export_loads_in_timm_and_back_in_our_doors(small_checkpoint, tmp_path, capsys):
    folder = tmp_path / "seresnext26d"
    argv = ["export", "--model", "seresnext26d_32x4d", "--checkpoint", str(small_checkpoint), "--format", "hf"]
    assert cli.main([*argv, "-o", str(folder), "--image-size", str(SIZE)]) == 0
    assert "hf (fp32, 64x64)" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    ours = build_model("seresnext26d_32x4d", pretrained_from_file=small_checkpoint)
    theirs = _timm_model(folder)
    diff, spread = _max_diff(ours, theirs)
    assert diff <= TOLERANCE and spread > 1e-3  # logits that depend on the input, equal to 1e-4
    assert theirs.pretrained_cfg["label_names"] == list(imagenet_classes().wnids)
    assert theirs.pretrained_cfg["label_descriptions"]["n01440764"] == "tench, Tinca tinca"
    assert _data_config(theirs) == _data_config(ours)  # bicubic 256 -> 224, timm's values
    assert _data_config(theirs)["interpolation"] == "bicubic"
    back = hubconf.seresnext26d_32x4d(pretrained_from_file=str(folder))  # the hub door reads the folder
    assert back.classes == imagenet_classes() and back.preprocessing == ours.preprocessing
    assert _max_diff(ours, back)[0] == 0.0
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "Resize the shorter side to 256 (bicubic)" in card
    assert 'timm.create_model("local-dir:' in card
    # --checkpoint FOLDER in another door
    classify = ["classify", str(IMAGES / "coffee.jpg"), "--model", "seresnext26d_32x4d", "--checkpoint", str(folder)]
    assert cli.main([*classify, "--precision", "fp32", "--format", "json", "--top-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["predictions"][0]["wnid"].startswith("n")


@pytest.mark.slow  # timm and our model side by side
def test_finetuned_checkpoint_keeps_its_classes_and_preset(finetuned, tmp_path):
    model = build_model(finetuned["architecture"], pretrained_from_file=finetuned["checkpoint"])
    folder = tmp_path / "shapes"
    export_hf(model, folder, image_size=SIZE, verify_batches=(2,))
    theirs = _timm_model(folder)
    assert theirs.num_classes == len(finetuned["classes"])
    assert theirs.pretrained_cfg["label_names"] == list(model.classes.names) == list(finetuned["classes"])
    assert _data_config(theirs) == _data_config(model)
    assert preset_of(json.loads((folder / "config.json").read_text())["pretrained_cfg"]) == model.preprocessing
    diff, _ = _max_diff(model, theirs)
    assert diff <= TOLERANCE
    back = build_model(finetuned["architecture"], pretrained_from_file=folder)
    assert back.classes.names == model.classes.names and back.preprocessing == model.preprocessing
    assert "not a published record" in (folder / "README.md").read_text()


@pytest.mark.slow  # a 101-layer model (at 64x64, one verification batch) beside timm's
def test_nvidia_resnext101_is_timms_resnext101_32x4d(tmp_path):
    model = build_model("resnext101_32x4d", pretrained=False)
    model.load_state_dict(random_state_dict("resnext101_32x4d", seed=7))
    folder = tmp_path / "resnext101"
    export_hf(model, folder, image_size=SIZE, verify_batches=(1,))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnext101_32x4d"
    assert config["pretrained_cfg"]["interpolation"] == "bilinear" and config["pretrained_cfg"]["crop_pct"] == 0.875
    theirs = _timm_model(folder)
    assert set(theirs.state_dict()) == set(model.state_dict())  # the same keys: a mapping of names only
    diff, spread = _max_diff(model, theirs)
    assert diff <= TOLERANCE and spread > 1e-3
    assert _data_config(theirs)["interpolation"] == "bilinear"  # NVIDIA's preprocessing, not timm's bicubic
    assert "not a published record" in (folder / "README.md").read_text()  # random weights: no published claims


def test_nvidia_se_resnext101_is_refused_with_the_reason(tmp_path, capsys):
    with torch.device("meta"):
        model = build_model("se_resnext101_32x4d", pretrained=False)
    with pytest.raises(ExportError, match="fixed 16 hidden channels") as error:
        export_hf(model, tmp_path / "out")
    assert "--format onnx" in str(error.value) and "seresnext101_32x4d" in str(error.value)
    argv = ["export", "--model", "nvidia_se_resnext101_32x4d", "--random-weights", "--format", "hf"]
    assert cli.main([*argv, "-o", str(tmp_path / "out")]) == 2  # a usage error, before the model loads
    assert "fixed 16 hidden channels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_models_timm_config_cannot_hold_are_refused(tmp_path):
    with torch.device("meta"):
        headless = build_model("seresnext26d_32x4d", pretrained=False, num_classes=0)
        gray = build_model("seresnext26d_32x4d", pretrained=False, in_chans=1)
    for model in (headless, gray):
        with pytest.raises(ExportError, match="timm's default construction"):
            export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def two_class_weights() -> bytes:
    """A random seresnext26d_32x4d with a 2-class head, as safetensors bytes."""
    return save(dict(random_state_dict("seresnext26d_32x4d", num_classes=2)))


def _folder(tmp_path, weights: bytes, **changes) -> str:
    """A folder in timm's format holding ``weights``, with ``changes`` to its config.json."""
    folder = tmp_path / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    preset = as_preset(None)
    cfg = {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875, "mean": preset.mean}
    config = {"architecture": "seresnext26d_32x4d", "num_classes": 2, "label_names": ["cat", "dog"]}
    config["pretrained_cfg"] = {**cfg, "std": preset.std, "crop_mode": "center"}
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_folder_reads_back_with_its_names_and_preset_or_is_refused(tmp_path, two_class_weights):
    w = two_class_weights
    model = build_model("seresnext26d_32x4d", pretrained_from_file=_folder(tmp_path, w))
    assert model.classes.names == ("cat", "dog") and model.preprocessing == as_preset(None)
    with pytest.raises(CheckpointError, match="model_args"):
        build_model("seresnext26d_32x4d", pretrained_from_file=_folder(tmp_path, w, model_args={"in_chans": 1}))
    with pytest.raises(CheckpointError, match="label_names must be a list of 2 names"):
        build_model("seresnext26d_32x4d", pretrained_from_file=_folder(tmp_path, w, label_names=["cat"]))
    with pytest.raises(CheckpointError, match="load it as seresnext26d_32x4d"):
        build_model("seresnext50_32x4d", pretrained_from_file=_folder(tmp_path, w))


def test_model_card_of_published_weights_states_accuracy_license_and_preprocessing():
    with torch.device("meta"):
        model = build_model("seresnext26d_32x4d", pretrained=False)
    model.meta = dataclasses.replace(model.meta, weights=model.meta.record)  # as if loaded from the record
    card = model_card(model, timm_config(model))
    assert "license: apache-2.0" in card and "License: Apache-2.0." in card
    assert "| imagenet-1k@224 | 77.592 | 93.614 |" in card and f"published by {model.meta.record.publisher}" in card
    assert "Resize the shorter side to 256 (bicubic), center-crop 224x224" in card
    assert "timm's test size: 288 (`test_crop_pct` 0.95)" in card
    with torch.device("meta"):
        nvidia = build_model("resnext101_32x4d", pretrained=False)
    nvidia.meta = dataclasses.replace(nvidia.meta, weights=nvidia.meta.record)
    card = model_card(nvidia, timm_config(nvidia))
    assert "license: other" in card and "NVIDIA" in card and "(bilinear)" in card
