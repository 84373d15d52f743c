"""``export --format triton --classifier openvino``: the classifier as an OpenVINO IR for Triton's OpenVINO backend.

PyTriton's server (the local Triton of the other tests) has no OpenVINO backend, so the repository is
checked as the ONNX one is without a server: every config parsed with Triton's model-config schema
(tritonclient's protobuf), checked against the IR's own inputs and outputs and the contract, and the
classifier IR run with OpenVINO. Loads OpenVINO: the Makefile runs this file in the OpenVINO pytest process.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from resnext_hub.cli import main as cli_main
from resnext_hub.models import build_model
from resnext_hub.triton.config import TritonConfigError, build_classifier_config, config_text
from resnext_hub.triton.contract import Contract
from resnext_hub.triton.validation import read_config, validate_model_dir, validate_repository

ARCH = "seresnext26d_32x4d"
SIZE = 64


def test_openvino_classifier_config_round_trips_with_warmup_and_refuses_gpu_options(tmp_path):
    contract = Contract("m", SIZE, 10, 5)
    config = build_classifier_config(contract, classifier="openvino", bf16=True, instance_count=2)
    (tmp_path / "config.pbtxt").write_text(config_text(config))
    parsed = read_config(tmp_path / "config.pbtxt")  # Triton's schema: an unknown field would fail here
    assert parsed == config and parsed.backend == "openvino" and not parsed.platform
    assert {key: value.string_value for key, value in parsed.parameters.items()} == {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "HINT_BF16": "YES",
    }
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(parsed.instance_group[0].KIND_CPU, 2)]
    warmups = [(w.batch_size, list(w.inputs["input"].dims), w.inputs["input"].zero_data) for w in parsed.model_warmup]
    assert warmups == [(1, [3, SIZE, SIZE], True), (16, [3, SIZE, SIZE], True)]
    with pytest.raises(TritonConfigError, match="runs on CPU instances in fp32, bf16 or int8"):
        build_classifier_config(contract, classifier="openvino", instance_kind="gpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--precision", "fp16"], "--classifier openvino is written in fp32, bf16, int8, not fp16"),
        (["--accelerator", "tensorrt"], "--classifier openvino runs on CPU instances"),
        (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
    ],
)
def test_export_command_checks_the_openvino_classifier_options(options, message, tmp_path, capsys):
    argv = ["export", "--model", ARCH, "--random-weights", "--format", "triton", "--classifier", "openvino"]
    assert cli_main([*argv, *options, "-o", str(tmp_path / "repo")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # exports and converts the small model
def test_openvino_classifier_repository_validates_and_answers_the_eager_top_k(small_checkpoint, tmp_path, capsys):
    import openvino as ov

    repo = tmp_path / "repo"
    argv = ["export", "--model", ARCH, "--checkpoint", str(small_checkpoint), "--format", "triton"]
    argv += ["--classifier", "openvino", "--image-size", str(SIZE), "--no-image-ensemble", "--top-k", "3"]
    assert cli_main([*argv, "-o", str(repo)]) == 0
    assert "triton (fp32, 64x64)" in capsys.readouterr().out
    configs = validate_repository(repo)
    classifier = repo / f"{ARCH}_classifier"
    assert configs[classifier.name].backend == "openvino"
    assert sorted(p.name for p in (classifier / "1").iterdir()) == ["model.bin", "model.xml"]

    # The IR answers the eager model's top-3 on any batch size (what Triton's dynamic batcher sends).
    model = build_model(ARCH, pretrained_from_file=small_checkpoint)
    compiled = ov.Core().compile_model(str(classifier / "1" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        answer = compiled({"input": x.numpy()})
        with torch.inference_mode():
            want = model(x).softmax(1).topk(3)
        assert answer["indices"].dtype == np.int64 and np.array_equal(answer["indices"], want.indices.numpy())
        assert np.allclose(answer["probabilities"], want.values.numpy(), atol=1e-5)

    # What Triton would refuse is caught: dims that are not the IR's, a missing weights file.
    text = (classifier / "config.pbtxt").read_text()
    broken = tmp_path / classifier.name
    shutil.copytree(classifier, broken)
    (broken / "config.pbtxt").write_text(text.replace(f"dims: {SIZE}", "dims: 32"))
    with pytest.raises(
        TritonConfigError, match=f"dims \\[3, 32, 32\\] in config, \\[3, {SIZE}, {SIZE}\\] in the graph"
    ):
        validate_model_dir(broken)
    (broken / "config.pbtxt").write_text(text)
    (broken / "1" / "model.bin").unlink()
    with pytest.raises(TritonConfigError, match="no model file 1/model.bin"):
        validate_model_dir(broken)
