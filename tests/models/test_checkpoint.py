"""Every checkpoint layout the publishers write loads; anything else is refused with a precise error.

The layouts, from NVIDIA DeepLearningExamples (PyTorch/Classification/ConvNets): the NGC 20.06.0 files
(a plain state dict with ``layerN`` stages and ``nn.Linear`` SE weights, image_classification/resnet.py);
its training checkpoints (``state_dict``, ``optimizer``, ``epoch``, ``best_prec1``, EMA weights beside them:
image_classification/training.py; DDP's ``module.`` prefix, which checkpoint2model.py strips); the later
code's ``layers.N`` stages with 1x1-convolution SE (image_classification/models/resnet.py and common.py);
and timm's own names (timm/models/resnet.py).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from resnext_hub.models import CheckpointError, build_model, read_checkpoint
from tools.fake_checkpoints import random_state_dict, to_nvidia_layout

ARCH = "se_resnext101_32x4d"


@pytest.fixture(scope="module")
def canonical():
    """Our (= timm's) names, 4-D SE weights."""
    return random_state_dict(ARCH, seed=3)


def _same_weights(model, canonical) -> None:
    state = model.state_dict()
    assert set(state) == set(canonical)
    for key, value in canonical.items():
        assert torch.equal(state[key], value), key


LAYOUTS = {
    "ngc_20.06_plain": lambda c: to_nvidia_layout(c),
    "training_checkpoint": lambda c: {
        "state_dict": to_nvidia_layout(c),
        "epoch": 90,
        "best_prec1": 80.03,
        "arch": "se-resnext101-32x4d",
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    },
    "ema_only": lambda c: {"ema_state_dict": to_nvidia_layout(c), "epoch": 3},
    "ddp_module_prefix": lambda c: to_nvidia_layout(c, prefix="module."),
    "layers_N_names": lambda c: to_nvidia_layout(c, stages="layers.N"),
    "trt_4d_se": lambda c: to_nvidia_layout(c, se_dims=4, stages="layers.N"),
    "timm_names": lambda c: OrderedDict(c),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_loads_exactly(layout, canonical, tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(LAYOUTS[layout](canonical), path)
    _same_weights(build_model(ARCH, pretrained_from_file=path), canonical)


@pytest.mark.slow
def test_state_dict_wins_over_ema(canonical, tmp_path):
    other = {k: v + 1 if v.is_floating_point() else v for k, v in canonical.items()}
    path = tmp_path / "both.pth.tar"
    torch.save({"state_dict": to_nvidia_layout(canonical), "ema_state_dict": to_nvidia_layout(other)}, path)
    _same_weights(build_model(ARCH, pretrained_from_file=path), canonical)


@pytest.mark.slow
def test_safetensors_file(canonical, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in canonical.items()}, str(path))
    _same_weights(build_model(ARCH, pretrained_from_file=path), canonical)


def test_missing_and_unexpected_keys_are_named(canonical, tmp_path):
    broken = to_nvidia_layout(canonical)
    del broken["layer3.7.conv2.weight"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as error:
        build_model(ARCH, pretrained_from_file=path)
    message = str(error.value)
    assert "missing keys (1): layer3.7.conv2.weight" in message
    assert "unexpected keys (1): layer5.0.conv1.weight" in message
    assert str(path) in message


def test_wrong_architecture_reports_shapes_and_counts(tmp_path, canonical):
    path = tmp_path / "se.pth"
    torch.save(to_nvidia_layout(canonical), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(132\): layer1\.0\.se\.fc1\.bias"):
        build_model("resnext101_32x4d", pretrained_from_file=path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_model("seresnext50_32x4d", pretrained_from_file=path)


@pytest.mark.slow
def test_state_dict_key_map_fn_runs_first(canonical, tmp_path):
    renamed = {f"backbone/{k}": v for k, v in to_nvidia_layout(canonical).items()}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    model = build_model(ARCH, pretrained_from_file=path, state_dict_key_map_fn=lambda k: k.removeprefix("backbone/"))
    _same_weights(model, canonical)


@pytest.mark.slow
def test_missing_batchnorm_counters_are_tolerated(canonical, tmp_path):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in canonical.items() if not k.endswith("num_batches_tracked")}, path)
    model = build_model(ARCH, pretrained_from_file=path)
    assert model.bn1.num_batches_tracked.item() == 0 and torch.equal(model.bn1.weight, canonical["bn1.weight"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "could not be loaded with torch.load"),
        (b"<html>not found</html>", "could not be loaded with torch.load"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a state dict of tensors, got list"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


SMALL = "seresnext26d_32x4d"


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["layer3.1.conv2.weight", "bn1.running_var", "fc.bias"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value, where):
    """A file that would make the model answer NaN for every image is refused at load, not served."""
    state = random_state_dict(SMALL, seed=1)
    state[where].view(-1)[0] = value
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"NaN or infinite values in 1 tensor\(s\): {where}"):
        build_model(SMALL, pretrained_from_file=path)


def test_a_value_beyond_the_models_range_is_refused(tmp_path):
    """float64 1e300 is finite in the file but infinite in the float32 model."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in random_state_dict(SMALL, seed=1).items()}
    state["fc.bias"][0] = 1e300
    path = tmp_path / "float64.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor\(s\): fc.bias"):
        build_model(SMALL, pretrained_from_file=path)


def _safetensors_with_header(path, header: bytes, body: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)


@pytest.mark.parametrize(
    "header",
    [
        b"[]",  # valid JSON, not an object
        b'"text"',
        b'{"fc.weight": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}',  # offsets of the wrong type
        b'{"fc.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}',
        b'{"fc.weight": []}',
        b'{"fc.weight": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 8]}}',  # shape lies about size
        b"{not json",
    ],
)
def test_safetensors_headers_that_lie_are_a_checkpoint_error(tmp_path, header):
    path = tmp_path / "lying.safetensors"
    _safetensors_with_header(path, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="lying.safetensors"):
        read_checkpoint(path)
