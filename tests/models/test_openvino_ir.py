"""A saved OpenVINO IR as a model: its metadata written and read back, and every way it can be wrong explained.

A tiny hand-built OpenVINO graph (global average pool and a 3-class matmul) stands in for a network:
what is tested here is the IR's metadata and its loading, which no conversion is needed for (the
small model's export is in tests/resnext_hub/test_export_openvino.py). Loads OpenVINO: the Makefile
runs this file in the OpenVINO pytest process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resnext_hub.engine import Engine
from resnext_hub.models import CheckpointError, build_model
from resnext_hub.models.cpu import cpu_has_native_bf16
from resnext_hub.models.openvino_ir import (
    BIN_FILE,
    IR_FORMAT,
    RT_KEY,
    XML_FILE,
    load_openvino_ir,
    openvino_ir_path,
    set_ir_metadata,
)
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import ClassList, ImageClassification, imagenet_classes

ov = pytest.importorskip("openvino", reason="needs openvino ([int8] extra)")

CLASSES = ClassList.of(("cat", "dog", "hot dog"))
PRESET = ImageClassification(36, 32, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
WEIGHTS = np.arange(9, dtype=np.float32).reshape(3, 3) - 4


def tiny_graph():
    """``(N, 3, H, W)`` -> the channel means times :data:`WEIGHTS`: logits of 3 classes, any batch and size."""
    ops = ov.opset13
    x = ops.parameter([-1, 3, -1, -1], ov.Type.f32, name="x")
    pooled = ops.reduce_mean(x, ops.constant(np.array([2, 3], dtype=np.int64)), keep_dims=False)
    return ov.Model([ops.matmul(pooled, ops.constant(WEIGHTS), False, True)], [x], "tiny")


def write(folder, precision="fp32", architecture="seresnext26d_32x4d", changed=None, classes=CLASSES):
    """The tiny graph saved with the metadata an export records (the ONNX file's keys, see onnx_metadata)."""
    graph = tiny_graph()
    metadata = {
        "classes": json.dumps(list(classes.names)),
        "preprocessing": json.dumps(PRESET.as_dict()),
        "image_size": "32",
        "architecture": architecture,
        "precision": precision,
    }
    set_ir_metadata(graph, metadata)
    for key, value in (changed or {}).items():
        graph.set_rt_info(value, [RT_KEY, key])
    folder.mkdir(exist_ok=True)
    ov.save_model(graph, str(folder / XML_FILE), compress_to_fp16=False)
    return folder


def test_metadata_round_trips_and_the_model_runs_as_written(tmp_path):
    folder = write(tmp_path / "ir")
    assert openvino_ir_path(folder) == openvino_ir_path(folder / XML_FILE) == folder / XML_FILE
    assert openvino_ir_path(tmp_path / "weights.pth") is None
    model = load_openvino_ir(folder, architecture="seresnext26d_32x4d")
    assert model.classes == CLASSES and model.classes.wnids is None and model.architecture == "seresnext26d_32x4d"
    assert model.preprocessing == PRESET and model.precision == "fp32" and model.weights_record is None
    assert model.compile_config == {"INFERENCE_PRECISION_HINT": "f32"}
    x = torch.randn(5, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    want = x.mean((2, 3)) @ torch.from_numpy(WEIGHTS).T
    assert torch.allclose(model(x), want, atol=1e-5) and torch.allclose(model(x[:1]), want[:1], atol=1e-5)
    ranked = Engine(model, InferenceOptions(device="cpu")).top_k(x[:1], 3)[0]
    assert [p.label for p in ranked] == [CLASSES.names[i] for i in want[0].argsort(descending=True)]
    with pytest.raises(ValueError, match=r"expected a batch \(N, 3, H, W\), got shape \(3, 8, 6\)"):
        model(x[0])


def test_imagenet_names_get_their_wordnet_ids_back(tmp_path):
    """ImageNet-1k's names (an ImageNet model's export): evaluate matches class folders by WordNet id."""
    model = load_openvino_ir(write(tmp_path / "ir", classes=imagenet_classes()))
    assert model.classes == imagenet_classes() and model.classes.wnid(0) == "n01440764"


def test_a_bf16_ir_is_compiled_with_the_bf16_hint_where_the_cpu_has_it(tmp_path):
    model = load_openvino_ir(write(tmp_path / "ir", precision="bf16"))
    assert model.precision == "bf16"
    assert model.compile_config == {"INFERENCE_PRECISION_HINT": "bf16" if cpu_has_native_bf16() else "f32"}
    assert load_openvino_ir(write(tmp_path / "int8", precision="int8")).compile_config == {}  # the plugin's defaults


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"format": "resnext_hub.openvino/0"}, f"this version reads '{IR_FORMAT}': export it again"),
        ({"precision": "fp64"}, "malformed resnext-hub metadata in the IR .*precision 'fp64'"),
        ({"classes": json.dumps([])}, "malformed resnext-hub metadata .*at least one class name"),
        ({"classes": json.dumps({"names": ["a"]})}, "classes must be a JSON list of names, got dict"),
        ({"preprocessing": "{"}, "malformed resnext-hub metadata in the IR"),
    ],
)
def test_bad_metadata_is_explained(tmp_path, changed, message):
    with pytest.raises(CheckpointError, match=message):
        load_openvino_ir(write(tmp_path / "ir", changed=changed))


def test_an_ir_that_is_not_ours_or_not_whole_or_of_another_model_is_refused(tmp_path):
    ov.save_model(tiny_graph(), str(tmp_path / XML_FILE))
    with pytest.raises(CheckpointError, match=f"without resnext-hub's metadata \\(rt_info {RT_KEY}/format"):
        load_openvino_ir(tmp_path)
    (tmp_path / BIN_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no model.bin beside it"):
        load_openvino_ir(tmp_path)
    with pytest.raises(CheckpointError, match="no OpenVINO IR there"):
        load_openvino_ir(tmp_path / "missing.xml")
    (tmp_path / XML_FILE).write_text("<net>")
    (tmp_path / BIN_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a readable OpenVINO IR"):
        load_openvino_ir(tmp_path)
    other = write(tmp_path / "other", architecture="seresnext50_32x4d")
    with pytest.raises(CheckpointError, match="holds seresnext50_32x4d, not seresnext26d_32x4d: pass --model"):
        load_openvino_ir(other, architecture="seresnext26d_32x4d")


def test_the_hub_builder_points_an_ir_to_its_loader(tmp_path):
    folder = write(tmp_path / "ir")
    with pytest.raises(CheckpointError, match="is an OpenVINO IR .*load_openvino_ir, or give it to the commands"):
        build_model("seresnext26d_32x4d", pretrained_from_file=folder)
