"""optimize_for_inference: every mode computes the model's function (fp32 exactly, bf16/fp16 faithfully).

Random weights with trained-like BatchNorm statistics (tests/checkpoints.py), small inputs
(64x64: folding, layout and precision act per pixel, so the property holds at any size) plus the
shared photos. CUDA tests run only where CUDA is present.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGES

from resnext_hub import processing
from resnext_hub.cli import main as cli_main
from resnext_hub.engine import Engine
from resnext_hub.models import VARIANTS, ResNet, build_model
from resnext_hub.options import InferenceOptions
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PHOTOS = sorted(IMAGES.glob("*.[jp][pn]g"))


@functools.cache
def state_of(architecture: str) -> dict[str, torch.Tensor]:
    return random_state_dict(architecture, seed=3)


@functools.cache
def model_of(architecture: str) -> ResNet:
    """One random-weight model per architecture, built once (a 101-layer build costs seconds)."""
    model = ResNet(VARIANTS[architecture])
    model.load_state_dict(state_of(architecture))
    return model.eval()


def inputs(n_random: int = 6, size: int = 64, device: str = "cpu") -> torch.Tensor:
    """The shared photos (NVIDIA's preprocessing, resized to ``size``) and random normalized images."""
    photos = F.interpolate(processing.prepare_batch(PHOTOS), size=(size, size), mode="bilinear", antialias=True)
    noise = torch.randn(n_random, 3, size, size, generator=torch.Generator().manual_seed(7))
    return torch.cat([photos, noise]).to(device)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def assert_faithful(reference: torch.Tensor, got: torch.Tensor) -> None:
    """Cosine >= 0.999 on every input; the same top-1 wherever the reference has a real margin.

    Random weights give near-tied logits on some inputs; a flip between classes whose logits
    differ by under 5% of the logits' spread is rounding between equals, not infidelity.
    """
    assert got.dtype == torch.float32 and got.shape == reference.shape
    cosine = F.cosine_similarity(got.double(), reference.double(), dim=1)
    assert cosine.min().item() >= 0.999, cosine
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * reference.std(dim=1)
    same = reference.argmax(1) == got.argmax(1)
    assert same[clear].all(), (same, clear)
    assert same.float().mean().item() >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(VARIANTS))
def test_fp32_is_exact(architecture):
    model = model_of(architecture)
    x = inputs(n_random=1)
    with torch.inference_mode():
        want = model(x)
        fast = model.optimize_for_inference("fp32")
        got = fast(x)
        got_nhwc = fast(x.contiguous(memory_format=torch.channels_last))
    assert fast.precision == "fp32" and not fast.training
    assert (got - want).abs().max().item() <= 1e-3
    assert torch.equal(got, got_nhwc)
    # Not a trivial pass: the logits differ between inputs by far more than the tolerance.
    assert (want[0] - want[1]).abs().max().item() > 1e-2


@pytest.mark.slow
def test_fp32_without_channels_last_is_exact():
    model = model_of(SMALL)
    x = inputs(n_random=2)
    fast = model.optimize_for_inference("fp32", channels_last=False)
    assert fast.stages[0][0].conv1.weight.is_contiguous()
    with torch.inference_mode():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_original_model_is_untouched_and_attributes_are_kept():
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(state_of(SMALL))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.optimize_for_inference("fp32")
    assert model.training and not fast.training  # the original keeps its mode; the copy is eval
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shared = {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in fast.parameters()}
    assert not shared
    assert not any(p.requires_grad for p in fast.parameters())
    assert fast.preprocessing == model.preprocessing and fast.architecture == SMALL
    assert fast.weights_record is model.weights_record
    x = inputs(n_random=1)
    model.eval()
    with torch.inference_mode():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-3
        with torch.no_grad():
            fast.stages[0][0].conv1.weight.zero_()  # changing the copy leaves the original as it was
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("architecture", [SMALL, "se_resnext101_32x4d"])
def test_bf16_is_faithful(architecture):
    model = model_of(architecture)
    x = inputs(n_random=11)
    fast = model.optimize_for_inference("bf16")
    assert fast.precision == "bf16" and fast.fc.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert_faithful(model(x), fast(x))


def test_bf16_spatial_mean_matches_mean():
    from resnext_hub.models.fused import _spatial_mean

    x = torch.rand(2, 64, 14, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    want = x.double().mean((2, 3))
    assert _spatial_mean(x).shape == (2, 64)
    assert (_spatial_mean(x).double() - want).abs().max().item() <= 4e-3  # bf16 rounding of values near 0.5
    assert torch.equal(_spatial_mean(x.float()), x.float().mean((2, 3)))


@pytest.mark.slow
def test_auto_picks_bf16_exactly_where_the_cpu_has_it():
    fast = model_of(SMALL).optimize_for_inference()
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert fast.precision == ("bf16" if native else "fp32")
    x = inputs(n_random=3)
    with torch.inference_mode():
        assert_faithful(model_of(SMALL)(x), fast(x))


@pytest.mark.slow
def test_auto_falls_back_to_fp32_when_reduced_precision_is_not_faithful():
    # Logits of 10000 + small: bf16 (and fp16) cannot tell the classes apart, fp32 can.
    model = copy.deepcopy(model_of(SMALL))
    with torch.no_grad():
        model.fc.bias += 1e4
    fast = model.optimize_for_inference("auto")
    assert fast.precision == "fp32"
    reduced = model.optimize_for_inference("bf16")
    x = inputs(n_random=2)
    with torch.inference_mode():
        want = model(x)
        assert (reduced(x).argmax(1) != want.argmax(1)).any()  # the check had a reason to refuse
        assert torch.equal(fast(x).argmax(1), want.argmax(1))


def test_bad_arguments_are_explained():
    model = model_of(SMALL)
    with pytest.raises(ValueError, match=r"precision must be one of .*'int8'\).*got 'int4'"):
        model.optimize_for_inference("int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16.*CUDA only"):
            model.optimize_for_inference("fp16")
    from resnext_hub.models.optimize import optimize_for_inference

    with pytest.raises(TypeError, match="needs a models.ResNet, got Linear"):
        optimize_for_inference(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_fp32_copy_can_be_traced():
    model = model_of(SMALL)
    fast = model.optimize_for_inference("fp32")
    with torch.inference_mode():
        traced = torch.jit.trace(fast, torch.randn(2, 3, 64, 64), check_trace=False)
    x = inputs(n_random=0)  # another batch size than traced with
    with torch.inference_mode():
        assert (traced(x) - model(x)).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_compile_keeps_the_function():
    """torch.compile of the auto copy (one small model; compiling takes ~30 s on 2 cores)."""
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(state_of(SMALL))
    fast = model.optimize_for_inference(compile=True)
    assert fast.preprocessing == model.preprocessing and fast.precision in ("bf16", "fp32")
    x = inputs(n_random=3)
    with torch.inference_mode():
        assert_faithful(model(x), fast(x))


@pytest.mark.slow
def test_classifier_uses_the_fast_path_and_exact_fp32_on_request(tmp_path, capsys):
    checkpoint = tmp_path / "small.pth"
    torch.save(state_of(SMALL), checkpoint)
    model = build_model(SMALL, pretrained_from_file=checkpoint)
    fast = Engine(model, InferenceOptions(device="cpu"))
    exact = Engine(model, InferenceOptions(device="cpu", precision="fp32"))
    assert fast.precision == model.optimize_for_inference().precision and exact.precision == "fp32"
    batch = processing.prepare_batch(PHOTOS, preprocessing=model)
    with torch.inference_mode():
        want = processing.top_k(model(batch), 5, logits=True)
    got = exact.top_k(batch, 5)
    assert [[p.index for p in row] for row in got] == [[p.index for p in row] for row in want]
    code = cli_main(["classify", str(PHOTOS[0]), "--model", SMALL, "--checkpoint", str(checkpoint)]
                    + ["--precision", "fp32", "--format", "json", "--no-progress", "--device", "cpu"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and [p["index"] for p in record["predictions"]] == [p.index for p in want[0]]
    assert [p["probability"] for p in record["predictions"]] == pytest.approx(
        [p.probability for p in want[0]], abs=1e-5
    )


@CUDA
@pytest.mark.parametrize("precision", ["fp32", "fp16", "auto"])
def test_cuda_modes(precision):
    model = copy.deepcopy(model_of(SMALL)).cuda()
    x = inputs(n_random=11, device="cuda")
    fast = model.optimize_for_inference(precision)
    expected = {"fp32": "fp32", "fp16": "fp16", "auto": "fp16"}[precision]
    assert fast.precision == expected and fast.fc.weight.device.type == "cuda"
    benchmark = torch.backends.cudnn.benchmark
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert got.device.type == "cuda"
    # cuDNN's algorithm search is on for the fast copy's own calls only: the process-wide flag is left as it was.
    assert torch.backends.cudnn.benchmark == benchmark
    if precision == "fp32":
        assert (got - want).abs().max().item() <= 1e-3
    else:
        assert_faithful(want, got)


@pytest.mark.slow
@CUDA
def test_cuda_compile():
    model = copy.deepcopy(model_of(SMALL)).cuda()
    fast = model.optimize_for_inference(compile=True)
    x = inputs(n_random=3, device="cuda")
    with torch.inference_mode():
        assert_faithful(model(x), fast(x))
