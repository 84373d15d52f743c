"""``export --format openvino``: an IR folder in int8 (calibrated once) or fp32, with its classes and preset in the IR,
loaded by classify, evaluate and predict without recalibrating.

The small model (random weights with trained-like BatchNorm statistics, the ``small_checkpoint`` fixture).
These tests load OpenVINO: the Makefile runs this file in the pytest process of its own that
tests/models/test_quantize.py gets (OpenVINO's thread pool crashed a later fork()).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import IMAGES, ROOT
from triton_servers import ServeProcess

from resnext_hub.cli import main as cli_main
from resnext_hub.engine import Engine
from resnext_hub.export.checks import ExportError
from resnext_hub.export.onnx_metadata import onnx_metadata
from resnext_hub.export.openvino_ir import export_openvino
from resnext_hub.models import CheckpointError, build_model
from resnext_hub.models.openvino_ir import IR_FORMAT, XML_FILE, OpenVINOResNet, ir_metadata, load_openvino_ir
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import imagenet_wnids

pytest.importorskip("openvino", reason="needs openvino ([int8] extra)")

ARCH = "seresnext26d_32x4d"
PHOTOS = sorted(IMAGES.glob("*.[jp][pn]g"))


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return build_model(ARCH, pretrained_from_file=small_checkpoint)


@pytest.fixture(scope="module")
def fp32_ir(model, tmp_path_factory) -> tuple[Path, object]:
    """An fp32 IR of the small model (verified at 64x64) and its export result."""
    folder = tmp_path_factory.mktemp("fp32") / "ir"
    return folder, export_openvino(model, folder, image_size=64)


@pytest.mark.slow
def test_fp32_ir_matches_eager_keeps_its_metadata_and_is_replaced_only_whole(model, fp32_ir, tmp_path, capsys):
    folder, result = fp32_ir
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    assert [c.batch_size for c in result.checks] == [1, 3] and all(c.max_abs_diff < 1e-3 for c in result.checks)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ir"]  # no staging folder left

    # The IR records what the ONNX file records (less its opset), read back as the model's own.
    import openvino as ov

    recorded = ir_metadata(ov.Core().read_model(str(folder / XML_FILE)))
    assert recorded == {"format": IR_FORMAT, **onnx_metadata(model, image_size=64, precision="fp32", opset=None)}
    loaded = load_openvino_ir(folder / XML_FILE, architecture=ARCH)
    assert isinstance(loaded, OpenVINOResNet) and loaded.precision == "fp32" and loaded.architecture == ARCH
    assert loaded.classes == model.classes and loaded.classes.wnids == tuple(imagenet_wnids())
    assert loaded.preprocessing == model.preprocessing and loaded.weights_record is None
    x = torch.randn(2, 3, 72, 80, generator=torch.Generator().manual_seed(3))  # any size, not only the export's
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-4 * max(1.0, model(x).abs().max().item()))
    # The engine runs it as it is: auto or its own precision; anything else, calibration or a GPU is explained.
    assert Engine(loaded, InferenceOptions(device="cpu")).precision == "fp32"
    with pytest.raises(ValueError, match="saved in fp32; it cannot run in bf16"):
        Engine(loaded, InferenceOptions(device="cpu", precision="bf16"))
    with pytest.raises(ValueError, match="drop --calibration"):
        loaded.optimize_for_inference(calibration=PHOTOS)
    with pytest.raises(ValueError, match="runs on the CPU, not cuda"):
        loaded.to("cuda")
    with pytest.raises(CheckpointError, match=f"holds {ARCH}, not se_resnext101_32x4d: pass --model {ARCH}"):
        load_openvino_ir(folder, architecture="se_resnext101_32x4d")

    # An existing IR: refused without overwrite, and left whole when the replacement fails its check.
    before = (folder / XML_FILE).read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_openvino(model, folder, image_size=64)
    with pytest.raises(ValueError, match="needs calibration images"):
        export_openvino(model, folder, precision="int8", overwrite=True)
    assert (folder / XML_FILE).read_bytes() == before

    # The command refuses an IR as the weights to export, before any work.
    argv = ["export", "--model", ARCH, "--checkpoint", str(folder), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]
    assert cli_main(argv) == 2
    assert "is an OpenVINO IR, an export already" in capsys.readouterr().err


# In a fresh process: classify, evaluate and predict through the command line with the saved IR, then which
# NNCF modules were imported (none: the IR is run as saved, never calibrated again).
DOORS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from resnext_hub.cli import main

    ir, photos, dataset, job = sys.argv[1:5]
    common = ["--model", "seresnext26d_32x4d", "--checkpoint", ir, "--device", "cpu", "--no-progress"]
    outs, codes = [], []
    for argv in (
        ["classify", photos, *common, "--format", "json", "--top-k", "1"],
        ["evaluate", dataset, *common, "--workers", "2"],  # DataLoader processes forked after OpenVINO loaded
        ["predict", photos, "-o", job, *common, "--workers", "0", "--top-k", "1"],
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes.append(main(argv))
        outs.append(out.getvalue())
    nncf = sorted(name for name in sys.modules if name.split(".")[0] == "nncf")
    print(json.dumps({"codes": codes, "outs": outs, "nncf": nncf}))
    """
)


@pytest.mark.slow
def test_int8_ir_through_classify_evaluate_and_predict_gives_the_in_process_int8_answers(
    model, small_checkpoint, tmp_path
):
    folder = tmp_path / "int8"
    argv = ["export", "--model", ARCH, "--checkpoint", str(small_checkpoint), "--format", "openvino"]
    assert cli_main([*argv, "--precision", "int8", "--calibration", str(IMAGES), "-o", str(folder)]) == 0
    assert load_openvino_ir(folder).precision == "int8"

    # The in-process int8 path, calibrated on the same images, in this process.
    engine = Engine(model, InferenceOptions(device="cpu", precision="int8", calibration=[str(p) for p in PHOTOS]))
    want = {str(r.input): r.predictions[0].index for r in engine.classify([str(p) for p in PHOTOS], k=1)}

    # A class-folder dataset: each photo under the WordNet id of its in-process top-1 (odd ones) or another class.
    dataset = tmp_path / "val"
    wnids = imagenet_wnids()
    for i, photo in enumerate(PHOTOS):
        index = want[str(photo)] if i % 2 == 0 else (want[str(photo)] + 1) % 1000
        (dataset / wnids[index]).mkdir(parents=True, exist_ok=True)
        (dataset / wnids[index] / photo.name).write_bytes(photo.read_bytes())

    job = tmp_path / "job.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", DOORS, str(folder), str(IMAGES), str(dataset), str(job)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0] and report["nncf"] == []

    classified = [json.loads(line) for line in report["outs"][0].splitlines()]
    assert {r["input"]: r["predictions"][0]["index"] for r in classified} == want
    summary = json.loads(report["outs"][1])
    assert summary["images"] == len(PHOTOS) and summary["precision"] == "int8" and summary["failed"] == 0
    assert summary["correct_top1"] == len(PHOTOS[::2])
    predicted = [json.loads(line) for line in job.read_text().splitlines()]
    assert {r["input"]: r["predictions"][0]["index"] for r in predicted} == want


@pytest.mark.slow
def test_serve_answers_with_the_saved_ir(fp32_ir, tmp_path):
    """``serve --checkpoint IR``: the contract's answers are the IR's own, its labels from the IR's metadata."""
    import tritonclient.http as httpclient

    folder, _ = fp32_ir
    local = Engine(load_openvino_ir(folder), InferenceOptions(device="cpu"))
    server = ServeProcess(ARCH, folder, tmp_path / "server.log", top_k=3)
    try:
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).numpy()
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = server.http.infer(ARCH, [tensor])
        expected = local.top_k(torch.from_numpy(x), 3)
        assert result.as_numpy("indices").tolist() == [[p.index for p in row] for row in expected]
        labels = [[label.decode() for label in row] for row in result.as_numpy("labels")]
        assert labels == [[p.label for p in row] for row in expected]
    finally:
        assert server.stop() == 0
