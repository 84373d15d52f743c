"""int8 (issue 14): static quantization through ``optimize_for_inference``, calibrated on the caller's images.

Fidelity on small inputs (the small model at 64x64: quantization acts per pixel and per channel, so
the property carries to 224) with random weights that have trained-like BatchNorm statistics. Speed
is measured only in benchmarks/inference.py. Backend tests skip where the backend is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGES
from test_head_surgery import WIDTH, small_model
from test_optimize import SMALL, assert_faithful, inputs, model_of, state_of
from torch import nn

from resnext_hub import processing
from resnext_hub.cli import main as cli_main
from resnext_hub.engine import Engine
from resnext_hub.models import HeadError, build_model, cpu, optimize, quantize
from resnext_hub.models.backend import BackendResNet
from resnext_hub.models.quantize import calibration_batches
from resnext_hub.options import InferenceOptions

PHOTOS = sorted(IMAGES.glob("*.[jp][pn]g"))
HAS_OPENVINO = bool(importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"))
HAS_TORCHAO = bool(importlib.util.find_spec("torchao"))
NEEDS_OPENVINO = pytest.mark.skipif(not HAS_OPENVINO, reason="needs openvino + nncf ([int8] extra)")
NEEDS_TORCHAO = pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao")
NEEDS_INT8_CPU = pytest.mark.skipif(not cpu.cpu_has_int8_dot(), reason="needs a CPU with VNNI or AMX")


def calibration_set() -> torch.Tensor:
    """The photos at 64x64 and other random images than :func:`inputs` (seed 11): calibration is not the test."""
    photos = inputs(n_random=0)
    noise = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    return torch.cat([photos, noise])


# -- calibration data ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_calibration_images_go_through_the_models_preset():
    model = build_model(SMALL, pretrained=False)
    batches = calibration_batches([str(p) for p in PHOTOS], model.preprocessing, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    want = processing.prepare_batch(PHOTOS, preprocessing=model)
    assert torch.equal(torch.cat(batches), want)
    # One path, one PIL image, a tensor image and a batch: all accepted, one size.
    image = processing.load_image(str(PHOTOS[0]))
    assert calibration_batches(PHOTOS[0], model.preprocessing)[0].shape == (1, 3, 224, 224)
    assert torch.equal(calibration_batches(image, model.preprocessing)[0], want[:1])
    assert calibration_batches(want[0], model.preprocessing)[0].shape == (1, 3, 224, 224)
    assert [b.shape[0] for b in calibration_batches([want, want[:2]], model.preprocessing)] == [5, 2]


@pytest.mark.parametrize(
    ("calibration", "error", "message"),
    [
        ([], ValueError, "calibration is empty"),
        (torch.zeros(2, 1, 8, 8), ValueError, r"expected a preprocessed image .* got shape \(2, 1, 8, 8\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ValueError, "expected a float tensor"),
        (torch.full((1, 3, 8, 8), float("nan")), ValueError, "NaN or infinite"),
        ([torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 9, 9)], ValueError, r"one size .*\[\(8, 8\), \(9, 9\)\]"),
        ([1.5], TypeError, "item 0: expected a tensor, an image path or URL, or a PIL.Image; got float"),
        (42, TypeError, "calibration must be .* got int"),
        (["/no/such/image.jpg"], ValueError, "/no/such/image.jpg"),
    ],
)
def test_bad_calibration_is_explained(calibration, error, message):
    with pytest.raises(error, match=message):
        calibration_batches(calibration, processing.as_preset(None))


# -- the API's rules ----------------------------------------------------------------------------------


def test_int8_rules_are_explained(monkeypatch):
    model = model_of(SMALL)
    with pytest.raises(ValueError, match=r"int8' needs calibration images"):
        model.optimize_for_inference("int8")
    with pytest.raises(ValueError, match="calibration applies to precision 'int8'.*not 'fp32'"):
        model.optimize_for_inference("fp32", calibration=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="int8 backend must be one of"):
        model.optimize_for_inference("int8", calibration=torch.zeros(1, 3, 64, 64), int8_backend="tensorrt")
    monkeypatch.setattr(quantize, "available_backends", lambda: [])
    with pytest.raises(ImportError, match=r"needs a quantization backend.*pip install 'resnext-hub\[int8\]'"):
        model.optimize_for_inference("int8", calibration=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ImportError, match=r"'openvino' needs openvino and nncf"):
        model.optimize_for_inference("int8", calibration=torch.zeros(1, 3, 64, 64), int8_backend="openvino")


@pytest.mark.slow
def test_auto_never_picks_int8_without_calibration_or_without_the_instructions(monkeypatch, caplog):
    model = model_of(SMALL)
    assert model.optimize_for_inference().precision != "int8"
    calls = []
    monkeypatch.setattr(optimize, "_int8", lambda *args: calls.append(args))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with caplog.at_level(logging.INFO):
        fast = model.optimize_for_inference("auto", calibration=inputs(n_random=1))
    assert fast.precision != "int8" and not calls
    assert "no int8 dot-product instructions" in caplog.text


def test_int8_without_vnni_warns(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(optimize, "_int8", lambda *args: "built")
    monkeypatch.setattr(quantize, "available_backends", lambda: ["torchao"])
    with caplog.at_level(logging.WARNING):
        assert model_of(SMALL).optimize_for_inference("int8", calibration=inputs(n_random=1)) == "built"
    assert "no int8 dot-product instructions (VNNI/AMX)" in caplog.text
    assert cpu.cpu_has_int8_dot() is False
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert cpu.cpu_has_int8_dot() is True


def test_quantized_module_checks_its_inputs():
    model = BackendResNet(model_of(SMALL).meta, "torchao", lambda x: x.mean((2, 3)), (64, 64))
    assert model.precision == "int8" and model.preprocessing == model_of(SMALL).preprocessing
    assert model(torch.ones(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="built for 64x64 images .* got 32x48"):
        model(torch.ones(1, 3, 32, 48))
    with pytest.raises(ValueError, match=r"expected a batch \(N, 3, H, W\)"):
        model(torch.ones(3, 64, 64))


# -- a replaced head (issue 19) ------------------------------------------------------------------------


def test_int8_refuses_a_head_without_classes_before_reading_the_images():
    model = small_model(nn.Identity())
    with pytest.raises(HeadError, match=r"int8' quantizes classifiers, and model\.fc is Identity"):
        model.optimize_for_inference("int8", calibration=["/no/such/image.jpg"])


def test_auto_does_not_try_int8_for_a_head_without_classes(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(optimize, "_int8", lambda *args: calls.append(args))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    model = small_model(nn.Identity())
    with caplog.at_level(logging.INFO):
        fast = model.optimize_for_inference("auto", calibration=inputs(n_random=1))
    assert not calls and "the head (fc) gives no classes: not trying int8" in caplog.text
    x = inputs(n_random=1)
    with torch.inference_mode():
        assert fast(x).shape == (len(x), WIDTH)


@pytest.mark.slow
@NEEDS_OPENVINO
def test_openvino_int8_keeps_a_replaced_head():
    """Sequential(Linear, Sigmoid) quantized with the rest (emulated and slower on CPUs without VNNI)."""
    model = small_model(nn.Sequential(nn.Linear(WIDTH, 5), nn.Sigmoid()))
    fast = model.optimize_for_inference("int8", calibration=calibration_set()[:8], int8_backend="openvino")
    assert isinstance(fast, BackendResNet) and fast.classes.names == ("0", "1", "2", "3", "4")
    x = inputs(n_random=3)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert got.shape == (len(x), 5) and bool(((got >= 0) & (got <= 1)).all())  # the sigmoid ran
    assert 1e-5 < (got - want).abs().max().item() <= 0.02  # int8, not the float copy; close to it


# -- the backends -------------------------------------------------------------------------------------


def check_int8(fast: torch.nn.Module, backend: str) -> None:
    model = model_of(SMALL)
    assert isinstance(fast, BackendResNet) and fast.precision == "int8" and fast.backend == backend
    assert fast.meta == model.meta and fast.architecture == model.architecture
    x = inputs(n_random=11)
    with torch.inference_mode():
        want, got = model(x), fast(x)
        one = fast(x[:1])  # any batch size; channels-last input too
        nhwc = fast(x.contiguous(memory_format=torch.channels_last))
    assert_faithful(want, got)
    # Really int8: not the float model (whose logits are within 1e-3 of the reference).
    assert (got - want).abs().max().item() > 1e-3
    assert torch.allclose(one, got[:1], atol=1e-4) and torch.allclose(nhwc, got, atol=1e-4)


@NEEDS_OPENVINO
@NEEDS_INT8_CPU
def test_openvino_int8_is_faithful():
    fast = model_of(SMALL).optimize_for_inference("int8", calibration=calibration_set(), int8_backend="openvino")
    check_int8(fast, "openvino")
    with torch.inference_mode():
        assert fast(torch.randn(3, 3, 96, 80)).shape == (3, 1000)  # OpenVINO's graph takes any image size
    # The int8 graph pools each SE block's output (the float graphs pool conv3's input, half the channels):
    # that way NNCF quantizes conv3's output and the gate multiply runs on int8.
    pooled = {
        op.input(0).get_partial_shape()[1].get_length()
        for op in fast.backend_model.get_ordered_ops()
        if op.get_type_name() == "ReduceMean"
    }
    assert pooled == {256, 512, 1024, 2048}


@NEEDS_TORCHAO
@NEEDS_INT8_CPU
def test_torchao_int8_is_faithful():
    """PT2E + inductor (compiles per batch size: ~1 min for the two sizes here on 2 cores)."""
    fast = model_of(SMALL).optimize_for_inference("int8", calibration=calibration_set(), int8_backend="torchao")
    check_int8(fast, "torchao")


@pytest.mark.skipif(not (HAS_OPENVINO or HAS_TORCHAO), reason="needs an int8 backend")
@NEEDS_INT8_CPU
def test_auto_with_calibration_picks_int8_and_the_engine_and_cli_run_it(tmp_path, capsys):
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(state_of(SMALL))
    fast = model.optimize_for_inference("auto", calibration=calibration_set())
    assert fast.precision == "int8" and fast.backend == quantize.available_backends()[0]
    engine = Engine(model, InferenceOptions(device="cpu", precision="int8", calibration=[str(p) for p in PHOTOS]))
    batch = processing.prepare_batch(PHOTOS, preprocessing=model)
    with torch.inference_mode():
        cosine = F.cosine_similarity(engine.logits(batch), model(batch)).min().item()
    assert engine.precision == "int8" and cosine >= 0.999
    checkpoint = tmp_path / "small.pth"
    torch.save(state_of(SMALL), checkpoint)
    argv = ["classify", str(PHOTOS[0]), "--model", SMALL, "--checkpoint", str(checkpoint), "--device", "cpu"]
    code = cli_main([*argv, "--precision", "int8", "--calibration", str(IMAGES), "--format", "json", "--no-progress"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and len(record["predictions"]) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
        (["--precision", "bf16", "--calibration", "x"], "--calibration applies to --precision int8 or auto, not bf16"),
        (["--exact", "--precision", "int8", "--calibration", "x"], "--exact means --precision fp32"),
    ],
)
def test_cli_precision_options_are_checked(options, message, capsys):
    assert cli_main(["classify", str(PHOTOS[0]), "--checkpoint", "unused.pth", *options]) == 2
    assert message in capsys.readouterr().err
