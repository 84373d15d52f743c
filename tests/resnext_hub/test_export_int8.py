"""``export --precision int8``: a QDQ ONNX file that ONNX Runtime runs, faithful to the float model, or nothing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGES

from resnext_hub import processing
from resnext_hub.cli import main as cli_main
from resnext_hub.export import ExportError
from resnext_hub.export.onnx_int8 import MIN_COSINE, export_onnx_int8
from resnext_hub.models import build_model
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"
PHOTOS = sorted(IMAGES.glob("*.[jp][pn]g"))


@pytest.fixture(scope="module")
def model():
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(random_state_dict(SMALL, seed=5))
    return model.eval()


def at_64(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)


@pytest.mark.slow
def test_int8_onnx_runs_in_onnx_runtime_and_is_faithful(model, tmp_path):
    photos = at_64(processing.prepare_batch(PHOTOS, preprocessing=model))
    noise = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    result = export_onnx_int8(model, tmp_path / "m.onnx", calibration=torch.cat([photos, noise]), image_size=64)
    assert result.dtype == "int8" and result.path.exists() and "logit cosine" in result.summary()
    assert [c.batch_size for c in result.checks] == [1, 15] and all(c.cosine_min >= MIN_COSINE for c in result.checks)
    written = onnx.load(str(result.path))
    assert [(o.domain, o.version) for o in written.opset_import] == [("", 18)] and written.ir_version == 8
    graph = written.graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {init.name: init for init in graph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4 for w in weights.values())  # int8 convs
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert (metadata["precision"], metadata["opset"], metadata["image_size"]) == ("int8", "18", "64")
    assert json.loads(metadata["classes"]) == list(model.classes.names)
    logits, probabilities = session.run(None, {"input": photos[:3].numpy()})  # another batch size than verified
    with torch.inference_mode():
        want = model(photos[:3])
    assert F.cosine_similarity(torch.from_numpy(logits), want).min().item() >= 0.999
    assert np.allclose(probabilities, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-6)  # fp32 softmax


@pytest.mark.slow
def test_unfaithful_int8_is_refused_and_leaves_nothing(model, tmp_path):
    # Calibrated on blank images, checked on photos: the activation ranges are far too narrow.
    photos = at_64(processing.prepare_batch(PHOTOS, preprocessing=model))
    with pytest.raises(ExportError, match=r"not faithful .* logit cosine 0\.\d+ \(needs >= 0.99\)"):
        export_onnx_int8(
            model, tmp_path / "m.onnx", calibration=torch.zeros(4, 3, 64, 64), image_size=64, verify=photos
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="calibration images are 64x64, the export is 96x96"):
        export_onnx_int8(model, tmp_path / "m.onnx", calibration=torch.zeros(1, 3, 64, 64), image_size=96)


def test_export_command_int8_options(tmp_path, capsys):
    base = ["export", "--model", SMALL, "--random-weights", "-o", str(tmp_path / "m.onnx")]
    assert cli_main([*base, "--format", "onnx", "--precision", "int8"]) == 2
    assert "--precision int8 needs --calibration DIR" in capsys.readouterr().err
    code = cli_main([*base, "--format", "torchscript", "--precision", "int8", "--calibration", str(IMAGES)])
    assert code != 0 and "use --format onnx" in capsys.readouterr().err
