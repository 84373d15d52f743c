"""Portable ONNX files: the opset and IR version ONNX Runtime 1.14 reads by default, ``--opset``, and the
class names and preprocessing in ``metadata_props``, read back through ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from resnext_hub import cli
from resnext_hub.export import ExportError, export_onnx, onnx_metadata
from resnext_hub.export.onnx_versions import check_versions, convert, written_versions
from resnext_hub.models import build_model
from resnext_hub.models.weights import get_weights

ARCH = "seresnext26d_32x4d"
SIZE = 64  # the properties here hold at any input size


def _session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow  # exports through the command line
def test_a_finetuned_checkpoint_exports_as_opset_18_ir_8_with_its_own_classes_and_preset(finetuned, tmp_path):
    out = tmp_path / "m.onnx"
    argv = ["export", "--model", ARCH, "--checkpoint", str(finetuned["checkpoint"]), "--format", "onnx", "-o", str(out)]
    assert cli.main(argv) == 0
    written = onnx.load(str(out))
    assert [(entry.domain, entry.version) for entry in written.opset_import] == [("", 18)]
    assert written.ir_version == 8
    assert not any(node.metadata_props for node in written.graph.node)  # IR 10's fields are gone
    model = build_model(ARCH, pretrained_from_file=finetuned["checkpoint"])
    preset = model.preprocessing
    session = _session(out)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == list(finetuned["classes"])
    assert json.loads(metadata["preprocessing"]) == preset.as_dict()
    expected = {"architecture": ARCH, "image_size": str(preset.crop_size), "precision": "fp32", "opset": "18"}
    assert {key: metadata[key] for key in expected} == expected
    assert "weights" not in metadata  # fine-tuned: no published record
    x = torch.randn(2, 3, preset.crop_size, preset.crop_size, generator=torch.Generator().manual_seed(3))
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow  # exports
def test_opset_17_is_written_as_asked_and_runs_in_onnx_runtime(tmp_path):
    model = build_model(ARCH, pretrained=False)
    result = export_onnx(model, tmp_path / "m17.onnx", image_size=SIZE, opset=17, verify_batches=(1,))
    assert written_versions(result.path) == (17, 8)
    assert result.checks[0].passed  # converted from the exporter's opset 18, then run by ONNX Runtime
    metadata = _session(result.path).get_modelmeta().custom_metadata_map
    assert (metadata["opset"], metadata["image_size"]) == ("17", str(SIZE))


def test_a_bad_opset_is_refused_before_anything_is_done(tmp_path, capsys):
    base = ["export", "--model", ARCH, "--random-weights", "-o", str(tmp_path / "m.onnx")]
    for opset in ("13", "24"):
        assert cli.main([*base, "--format", "onnx", "--opset", opset]) == 2
        assert f"--opset {opset} is not one this export writes: give 14 to 23" in capsys.readouterr().err
    assert cli.main([*base, "--format", "triton", "--opset", "7"]) == 2
    assert "--opset 7 is not one this export writes" in capsys.readouterr().err
    with pytest.raises(ExportError, match="opset 12 is not one this export writes"):
        export_onnx(torch.nn.Linear(3, 2), tmp_path / "m.onnx", opset=12)
    assert list(tmp_path.iterdir()) == []


def _mean_graph(ir_version: int = 10) -> onnx.ModelProto:
    """What torch's exporter writes at opset 18: ReduceMean with its axes as an input, per-node records, IR 10."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0, noop_with_empty_axes=0)
    node.metadata_props.add(key="namespace", value="model.pool")
    graph = helper.make_graph(
        [node],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [axes],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]  # the second unused
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def test_an_opset_18_graph_converts_to_17_with_ir_8_and_computes_the_same(tmp_path):
    converted = convert(_mean_graph(), 17)
    path = tmp_path / "m.onnx"
    onnx.save(converted, str(path))
    check_versions(path, 17)
    assert [(entry.domain, entry.version) for entry in converted.opset_import] == [("", 17)]
    (node,) = converted.graph.node
    assert {a.name for a in node.attribute} == {"axes", "keepdims"} and not node.metadata_props
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    (y,) = _session(path).run(None, {"x": x})
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-6)


def test_a_file_in_other_versions_than_asked_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_mean_graph(ir_version=10), str(path))
    with pytest.raises(ExportError, match="written as opset 18, IR version 10; opset 18, IR version 8 was asked for"):
        check_versions(path, 18)
    with pytest.raises(ExportError, match="written as opset 18, IR version 10; opset 17, IR version 8 was asked"):
        check_versions(path, 17)


def test_metadata_names_the_published_weights_and_their_license():
    record = get_weights(ARCH)
    model = build_model(ARCH, pretrained=False)
    model.meta = dataclasses.replace(model.meta, weights=record)
    metadata = onnx_metadata(model, image_size=SIZE, precision="fp16", opset=18)
    assert metadata["weights"] == record.name and metadata["model_license"] == record.license
    assert json.loads(metadata["classes"]) == list(record.class_list.names)
    assert json.loads(metadata["preprocessing"]) == record.preprocessing.as_dict()
    bare = onnx_metadata(torch.nn.Linear(3, 2), image_size=SIZE, precision="fp32", opset=18)
    assert bare == {"image_size": str(SIZE), "precision": "fp32", "opset": "18"}
