"""``"auto"`` measures its candidates against fp32 once per machine and caches the choice (models/autotune.py).

The decision is tested on timings fed in (a shared machine's clock makes timing assertions flaky);
one real measurement on the small model checks the plumbing and that a slower contender loses.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging

import pytest
import torch
from torch import nn

from resnext_hub.models import autotune, build_model
from resnext_hub.models.cpu import cpu_has_native_bf16
from resnext_hub.models.fused import OptimizedResNet
from resnext_hub.models.openvino_runtime import float_graph_cache, openvino_float
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"


class Twice(nn.Module):
    """``module`` run twice per call: the same answers, twice the time."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.module(x)
        return self.module(x)


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(random_state_dict(SMALL, seed=3))
    return model.eval()


@pytest.fixture
def measured(monkeypatch, torch_home):
    """Measuring on (the suite turns it off, see conftest), in an empty torch.hub cache."""
    monkeypatch.setenv(autotune.MEASURE_ENV, "1")
    monkeypatch.delenv(autotune.REMEASURE_ENV, raising=False)
    return autotune.choice_file()


def test_a_faster_candidate_wins_by_its_paired_ratio():
    times = {"fp32": [1.0, 1.1, 0.9, 1.0], "bf16": [0.5, 0.6, 0.45, 0.5], "int8": [0.3, 0.35, 0.28, 0.31]}
    assert autotune.decide(times) == "int8"
    assert autotune.paired_ratios(times)["bf16"] == pytest.approx(0.5, abs=0.01)


def test_a_candidate_slower_or_within_the_margin_of_fp32_loses():
    assert autotune.decide({"fp32": [1.0, 1.0, 1.0], "bf16": [1.3, 1.2, 1.4]}) == "fp32"
    assert autotune.decide({"fp32": [1.0, 1.0, 1.0], "bf16": [0.97, 0.98, 0.99]}) == "fp32"  # within 5%: exact wins
    assert autotune.decide({"fp32": [1.0, 1.0, 1.0], "bf16": [0.9, 0.9, 0.9]}) == "bf16"


def test_load_on_the_machine_does_not_flip_the_choice():
    # A neighbour slows the machine 3x in rounds 2 and 3 (every contender alike); the candidate is 1.3x slower
    # than fp32 throughout. A best-of or a pooled median would be misled by the slow rounds; paired ratios are not.
    fp32 = [1.0, 3.0, 3.0, 1.0, 1.0]
    slow = [1.3, 3.9, 3.9, 1.3, 1.3]
    assert autotune.decide({"fp32": fp32, "bf16": slow}) == "fp32"
    # The same load falling on fp32 alone in one round (a burst within it) does not make a slower candidate win.
    assert autotune.decide({"fp32": [1.0, 3.0, 1.0, 1.0, 1.0], "bf16": slow[:1] * 5}) == "fp32"


@pytest.mark.slow  # ~5 s: the fp32 copy is built and warmed up
def test_a_real_measurement_never_keeps_a_slower_contender(small_model):
    exact = small_model.optimize_for_inference("fp32", reuse_memory=False)
    x = torch.randn(1, 3, 64, 64)
    times = autotune.measure({"fp32": exact, "twice": Twice(exact)}, x, budget_s=0.3, min_rounds=3, max_rounds=5)
    assert 3 <= len(times["fp32"]) == len(times["twice"]) <= 5
    assert all(t > 0 for samples in times.values() for t in samples)
    assert autotune.decide(times) == "fp32"


def test_the_choice_is_recorded_atomically_and_read_back_by_its_key(tmp_path):
    path = tmp_path / "cache" / "auto_precision.json"
    key = autotune.choice_key(SMALL, "batch", "cpu", ["bf16"])
    assert autotune.cached_choice(key, path) is None
    autotune.record_choice(key, "bf16", {"bf16": 0.52}, path)
    other = autotune.choice_key(SMALL, "single", "cpu", ["bf16"])
    autotune.record_choice(other, "fp32", {"bf16": 1.1}, path)
    assert autotune.cached_choice(key, path) == "bf16"  # the second record kept the first
    assert autotune.cached_choice(other, path) == "fp32"
    assert sorted(p.name for p in path.parent.iterdir()) == ["auto_precision.json"]  # no staging debris
    data = json.loads(path.read_text())
    assert data["choices"][key]["time_vs_fp32"] == {"bf16": 0.52}


def test_a_changed_key_is_a_miss():
    base = autotune.choice_key(SMALL, "batch", "cpu", ["bf16"])
    assert base != autotune.choice_key("se_resnext101_32x4d", "batch", "cpu", ["bf16"])
    assert base != autotune.choice_key(SMALL, "single", "cpu", ["bf16"])
    assert base != autotune.choice_key(SMALL, "batch", "cpu", ["int8", "bf16"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert base != autotune.choice_key(SMALL, "batch", "cpu", ["bf16"])
    finally:
        torch.set_num_threads(threads)
    parts = json.loads(base)
    assert {"cpu", "flags", "torch", "openvino", "architecture", "regime", "threads"} <= set(parts)
    assert parts["torch"] == torch.__version__


def test_an_unreadable_cache_file_is_a_miss_and_is_rewritten(tmp_path, caplog):
    path = tmp_path / "auto_precision.json"
    caplog.set_level(logging.INFO, logger=autotune.__name__)  # whatever levels earlier tests' libraries left set
    path.write_text("{ half a file")
    key = autotune.choice_key(SMALL, "batch", "cpu", ["bf16"])
    assert autotune.cached_choice(key, path) is None
    assert "ignoring" in caplog.text
    autotune.record_choice(key, "bf16", {"bf16": 0.5}, path)
    assert autotune.cached_choice(key, path) == "bf16"


def test_an_unwritable_cache_costs_only_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=autotune.__name__)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    autotune.record_choice("key", "fp32", {}, blocker / "auto_precision.json")
    assert "could not record the choice" in caplog.text


def test_measuring_is_off_in_the_suite_and_a_remeasure_is_asked_by_env(monkeypatch):
    assert not autotune.measuring()  # conftest: the rest of the suite does not time anything
    monkeypatch.setenv(autotune.REMEASURE_ENV, "1")
    assert autotune.remeasure_requested()
    assert autotune.regime(1) == "single" and autotune.regime(16) == autotune.regime(None) == "batch"


@pytest.mark.slow
@pytest.mark.skipif(
    not cpu_has_native_bf16() and importlib.util.find_spec("openvino") is None,
    reason="auto has candidates to measure on native-bf16 CPUs or where OpenVINO is installed",
)
def test_auto_measures_once_then_uses_the_cached_choice(small_model, measured):
    """The whole path on the small model: measured and recorded, then read back (no timing asserted)."""
    first = small_model.optimize_for_inference("auto", reuse_memory=False, batch_size=1)
    data = json.loads(measured.read_text())
    ((key, entry),) = data["choices"].items()
    assert json.loads(key)["regime"] == "single" and json.loads(key)["architecture"] == SMALL
    assert first.precision == entry["choice"].partition("+")[0]  # "bf16+openvino" computes in bf16
    assert set(entry["time_vs_fp32"]) <= {"bf16", "bf16+openvino", "fp32+openvino"} and entry["time_vs_fp32"]
    # A choice in the file is what the next call takes, without measuring: fp32, written there by hand.
    data["choices"][key] = {"choice": "fp32", "time_vs_fp32": {}}
    measured.write_text(json.dumps(data))
    assert small_model.optimize_for_inference("auto", reuse_memory=False, batch_size=1).precision == "fp32"
    # remeasure=True times again and records afresh.
    small_model.optimize_for_inference("auto", reuse_memory=False, batch_size=1, remeasure=True)
    assert json.loads(measured.read_text())["choices"][key]["time_vs_fp32"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="OpenVINO bf16 is one of auto's candidates on native-bf16 CPUs")
def test_the_openvino_bf16_candidate_computes_the_models_function(small_model, torch_home):
    """auto's "bf16+openvino": our fused graph run by OpenVINO in bf16, batches split over its streams."""
    exact = OptimizedResNet(small_model, dtype=torch.float32, channels_last=False)
    candidate = openvino_float(copy.deepcopy(exact), torch.randn(2, 3, 64, 64), "bf16")
    assert (candidate.precision, candidate.backend) == ("bf16", "openvino")
    assert candidate.preprocessing == small_model.preprocessing
    x = torch.randn(3, 3, 96, 80)  # another batch and image size than converted with
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(candidate(x), exact(x)).min().item()
    assert cosine >= 0.999


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_a_converted_float_graph_is_saved_once_and_read_by_the_next_process(small_model, torch_home):
    """The OpenVINO float backend's conversion (minutes for the 101-layer nets on a busy 2-core machine) is paid once
    per set of weights: the next copy reads the saved graph (the folder is not written again)."""
    exact = OptimizedResNet(small_model, dtype=torch.float32, channels_last=False)
    example = torch.randn(2, 3, 64, 64)
    first = openvino_float(copy.deepcopy(exact), example, "fp32")
    saved = sorted(float_graph_cache().iterdir())
    assert [sorted(p.name for p in folder.iterdir()) for folder in saved] == [["model.bin", "model.xml"]]
    stamp = saved[0].stat().st_ino, (saved[0] / "model.bin").stat().st_mtime_ns
    second = openvino_float(copy.deepcopy(exact), example, "fp32")
    assert sorted(float_graph_cache().iterdir()) == saved
    assert (saved[0].stat().st_ino, (saved[0] / "model.bin").stat().st_mtime_ns) == stamp
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = exact(x)
        assert torch.allclose(second(x), first(x), rtol=0, atol=1e-5 * want.abs().max())
        assert torch.allclose(second(x), want, rtol=0, atol=1e-3 * want.abs().max())  # fp32 weights, not fp16
    other = copy.deepcopy(exact)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    openvino_float(other, example, "fp32")  # other weights: another graph
    assert len(list(float_graph_cache().iterdir())) == 2


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_openvino_fp32_is_a_candidate_on_every_cpu_when_measuring():
    """Where OpenVINO is installed, its fp32 copy of the same graph competes with torch's fp32 on any CPU
    (on CPUs without native bf16 it is auto's only float candidate); not when measuring is off or compiling."""
    from resnext_hub.models.optimize import _candidates

    cpu = torch.device("cpu")
    assert "fp32+openvino" in _candidates(cpu, calibrated=False, openvino=True)
    assert ("bf16+openvino" in _candidates(cpu, calibrated=False, openvino=True)) == cpu_has_native_bf16()
    assert not any(name.endswith("+openvino") for name in _candidates(cpu, calibrated=False, openvino=False))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_a_cached_openvino_fp32_choice_builds_openvinos_fp32_copy(small_model, measured):
    """A recorded "fp32+openvino" is built without timing: OpenVINO's fp32 copy, the exact copy's function."""
    from resnext_hub.models.optimize import _candidates

    names = _candidates(torch.device("cpu"), calibrated=False, openvino=True)
    key = autotune.choice_key(SMALL, "single", "cpu", names)
    autotune.record_choice(key, "fp32+openvino", {"fp32+openvino": 0.5})
    fast = small_model.optimize_for_inference("auto", reuse_memory=False, batch_size=1)
    assert (fast.precision, fast.backend) == ("fp32", "openvino")
    exact = small_model.optimize_for_inference("fp32", reuse_memory=False)
    x = torch.randn(2, 3, 80, 64)
    with torch.inference_mode():
        want = exact(x)
        assert torch.allclose(fast(x), want, rtol=0, atol=1e-4 * want.abs().max())
    assert json.loads(measured.read_text())["choices"][key]["time_vs_fp32"] == {"fp32+openvino": 0.5}  # not re-timed
