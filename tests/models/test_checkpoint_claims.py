"""A checkpoint is used only when it is what it claims (issue 20): its head fits the classes the model
names, it is of the architecture asked for, and a file that is no checkpoint is refused without
torch's advice to load it unsafely.

A head for other classes is never replaced by a random one unless the caller asked for another
class count (``num_classes=N``: keep the backbone, add a fresh head, as documented); a fine-tuned
file whose head disagrees with its own class names is refused whatever is asked.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import IMAGES
from test_finetuned_checkpoint import NAMES, PRESET

from resnext_hub import exit_codes
from resnext_hub.cli import main
from resnext_hub.models import CheckpointError, build_model, read_checkpoint
from resnext_hub.models.finetuned import finetuned_checkpoint
from resnext_hub.processing import ClassList
from tools.fake_checkpoints import random_state_dict

ARCH = "seresnext26d_32x4d"


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """A plain state dict of ARCH with a 10-class head (no class names): (path, state)."""
    state = random_state_dict(ARCH, seed=7, num_classes=10)
    path = tmp_path_factory.mktemp("ten") / "ten.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("num_classes", [None, 1000])
def test_a_head_for_other_classes_than_the_model_names_is_refused_unless_another_count_is_asked(
    ten_classes, num_classes
):
    """Unset, or set to the count whose names the model would carry (ImageNet's): never a random head.
    Asked for the file's own count, its head is kept; for another count, its backbone (documented)."""
    path, state = ten_classes
    with pytest.raises(CheckpointError) as caught:
        build_model(ARCH, pretrained_from_file=path, num_classes=num_classes)
    message = str(caught.value)
    assert str(path) in message and "(10, 2048)" in message and "expects 1000" in message, message
    assert "num_classes=10" in message  # how to use the file as it is
    own = build_model(ARCH, pretrained_from_file=path, num_classes=10)
    assert own.num_classes == 10 and torch.equal(own.fc.weight, state["fc.weight"])
    other = build_model(ARCH, pretrained_from_file=path, num_classes=4)  # the documented feature: a fresh head
    assert other.num_classes == 4 and not other.fc.weight.is_meta
    assert torch.equal(other.conv1[0].weight, state["conv1.0.weight"])


def test_classify_with_a_checkpoint_whose_head_does_not_fit_is_one_error_line(ten_classes, capsys):
    path, _ = ten_classes
    photo = str(IMAGES / "chelsea.jpg")
    assert main(["classify", photo, "--model", ARCH, "--checkpoint", str(path)]) == exit_codes.WEIGHTS_UNAVAILABLE
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert str(path) in captured.err and "10 classes" in captured.err


@pytest.mark.parametrize("rows", [2, 5])
@pytest.mark.parametrize("num_classes", [None, 3, 7])
def test_a_finetuned_file_whose_head_contradicts_its_class_names_is_refused(rows, num_classes, tmp_path):
    path = tmp_path / "best.pth"
    weights = random_state_dict(ARCH, seed=3, num_classes=rows)
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=PRESET)
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"names 3 classes but holds a head for {rows} classes") as caught:
        build_model(ARCH, pretrained_from_file=path, num_classes=num_classes)
    assert str(path) in str(caught.value)


def test_a_checkpoint_of_another_architecture_is_refused_with_both_names(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(random_state_dict("seresnext26t_32x4d", seed=1), path)
    with pytest.raises(CheckpointError, match=f"holds the weights of seresnext26t_32x4d, not {ARCH}") as caught:
        build_model(ARCH, pretrained_from_file=path)
    assert "--model seresnext26t_32x4d" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [b"<!DOCTYPE html><html>Sign in</html>", pickle.dumps({"a": 1}, protocol=0)],
    ids=["html", "pickle-protocol-0"],
)
def test_a_file_that_is_no_checkpoint_is_refused_without_unsafe_advice(content, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "Only files of tensors" in message
    assert "weights_only` set to `False`" not in message and "Re-running" not in message, message
    assert "arbitrary code" not in message and "file an issue" not in message, message


@pytest.mark.parametrize("name", ["caf\udce9", "two\nlines", "bell\x07"])
def test_class_names_in_a_checkpoint_that_are_not_text_are_refused(name, tmp_path):
    path = tmp_path / "best.pth"
    weights = random_state_dict(ARCH, seed=3, num_classes=3)
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=PRESET)
    torch.save({**content, "classes": [name, *NAMES[1:]]}, path)
    with pytest.raises(CheckpointError, match="malformed fine-tuned checkpoint metadata.*valid UTF-8 text"):
        build_model(ARCH, pretrained_from_file=path)
