"""A multi-label fine-tuned checkpoint: its thresholds saved with its labels, restored on load, kept by the
fast path, dropped with the head they were chosen for; files that contradict themselves are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from resnext_hub.models import CheckpointError, build_model
from resnext_hub.models.finetuned import finetuned_checkpoint, read_finetuned_meta
from resnext_hub.processing import ClassList
from resnext_hub.processing.presets import as_preset

ARCH = "seresnext26d_32x4d"
LABELS = ClassList.of(["sea", "sky", "tree"])
THRESHOLDS = (0.25, 0.5, 0.75)
PRESET = replace(as_preset(None), resize_size=73, crop_size=64)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_model(ARCH, pretrained=False, num_classes=3).state_dict()


def _save(path, weights, **changes):
    content = finetuned_checkpoint(
        weights, architecture=ARCH, classes=LABELS, preprocessing=PRESET, thresholds=list(THRESHOLDS)
    )
    content.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del content[key]
    torch.save(content, path)
    return path


def test_thresholds_are_saved_with_the_labels_and_restored(tmp_path, weights):
    path = _save(tmp_path / "best.pth", weights)
    meta = read_finetuned_meta(path)
    assert meta.classes == LABELS and meta.thresholds == THRESHOLDS
    model = build_model(ARCH, pretrained_from_file=path)
    assert model.multi_label and model.thresholds == THRESHOLDS and model.classes == LABELS
    assert model.preprocessing == PRESET
    fast = model.optimize_for_inference("fp32")
    assert fast.multi_label and fast.thresholds == THRESHOLDS and fast.classes == LABELS


def test_a_new_head_drops_the_thresholds(tmp_path, weights):
    path = _save(tmp_path / "best.pth", weights)
    backbone = build_model(ARCH, pretrained_from_file=path, num_classes=5)  # the backbone only: a fresh head
    assert not backbone.multi_label and backbone.thresholds is None
    model = build_model(ARCH, pretrained_from_file=path)
    model.reset_classifier(3, classes=LABELS)
    assert not model.multi_label
    model = build_model(ARCH, pretrained_from_file=path)
    model.fc = torch.nn.Linear(model.num_features, 7)  # replaced by hand: its thresholds no longer fit
    assert model.thresholds is None and not model.multi_label


def test_a_single_label_checkpoint_says_nothing_of_thresholds(tmp_path, weights):
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=LABELS, preprocessing=PRESET)
    assert "multi_label" not in content and "thresholds" not in content
    torch.save(content, tmp_path / "single.pth")
    model = build_model(ARCH, pretrained_from_file=tmp_path / "single.pth")
    assert not model.multi_label and model.thresholds is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thresholds": [0.5, 0.5]}, "needs 3 thresholds"),
        ({"thresholds": [0.5, 0.5, 1.5]}, "between 0 and 1"),
        ({"multi_label": None}, "multi_label is not true"),  # thresholds left without the flag
    ],
)
def test_thresholds_that_contradict_the_file_are_refused(tmp_path, weights, changes, message):
    path = _save(tmp_path / "bad.pth", weights, **changes)
    with pytest.raises(CheckpointError, match=message):
        build_model(ARCH, pretrained_from_file=path)
