"""Fine-tuned checkpoints: weights plus class names and preset, read back by build_model(pretrained_from_file=...)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from resnext_hub.models import CheckpointError, build_model
from resnext_hub.models.finetuned import finetuned_checkpoint, read_finetuned_meta
from resnext_hub.processing import ClassList, ImageClassification
from tools.fake_checkpoints import random_state_dict

ARCH = "seresnext26d_32x4d"
NAMES = ["circle", "square", "triangle"]
PRESET = ImageClassification(73, 64, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def weights() -> dict:
    return random_state_dict(ARCH, seed=3, num_classes=len(NAMES))


@pytest.fixture(scope="module")
def finetuned(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("finetuned") / "best.pth"
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=PRESET)
    torch.save({**content, "epoch": 3}, path)
    return path


def test_the_metadata_is_plain_values_and_reads_back(finetuned, weights, tmp_path):
    # Plain values: the file loads with weights_only=True, as every checkpoint here is loaded.
    data = torch.load(finetuned, weights_only=True)
    assert data["classes"] == NAMES and data["preprocessing"] == PRESET.as_dict() and data["architecture"] == ARCH
    meta = read_finetuned_meta(finetuned)
    assert meta.architecture == ARCH and meta.classes.names == tuple(NAMES) and meta.preprocessing == PRESET
    plain = tmp_path / "plain.pth"
    torch.save(weights, plain)
    assert read_finetuned_meta(plain) is None
    assert read_finetuned_meta(tmp_path / "missing.pth") is None


def test_build_model_takes_classes_and_preset_from_the_file(finetuned, weights):
    model = build_model(ARCH, pretrained_from_file=finetuned)
    assert model.num_classes == 3 and model.classes.names == tuple(NAMES)
    assert model.preprocessing == PRESET and model.weights_record is None and model.architecture == ARCH
    assert torch.equal(model.fc.weight, weights["fc.weight"])
    hub = torch.hub.load(str(ROOT), ARCH, source="local", pretrained_from_file=str(finetuned))
    assert hub.classes.names == tuple(NAMES) and hub.preprocessing == PRESET


def test_another_num_classes_keeps_the_backbone_with_a_fresh_head(finetuned, weights):
    model = build_model(ARCH, pretrained_from_file=finetuned, num_classes=5)
    assert model.num_classes == 5 and model.classes.names == ("0", "1", "2", "3", "4")
    assert model.preprocessing == PRESET and torch.equal(model.conv1[0].weight, weights["conv1.0.weight"])


def test_another_architecture_is_refused_by_name(finetuned):
    with pytest.raises(CheckpointError, match=f"fine-tuned from {ARCH}, not seresnext50_32x4d.*--model {ARCH}"):
        build_model("seresnext50_32x4d", pretrained_from_file=finetuned)


def test_malformed_metadata_is_refused(weights, tmp_path):
    path = tmp_path / "bad.pth"
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=PRESET)
    torch.save({**content, "classes": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="malformed fine-tuned checkpoint metadata"):
        build_model(ARCH, pretrained_from_file=path)
