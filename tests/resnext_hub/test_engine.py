"""The inference engine: devices, the fast path, decoding in threads or loader processes, errors as results."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import RGB_PHOTOS

from resnext_hub.engine import Engine, resolve_device
from resnext_hub.models import build_model
from resnext_hub.options import InferenceOptions, usable_cpus

ARCH = "seresnext26d_32x4d"


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(build_model(ARCH, pretrained=False, num_classes=10), InferenceOptions(device="cpu", precision="fp32"))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_every_input_gets_a_result_in_order_and_bad_ones_an_error(engine, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>404</html>")
    items = [str(RGB_PHOTOS[0]), str(broken), str(tmp_path / "missing.png"), RGB_PHOTOS[1].read_bytes()]
    results = list(engine.classify(items, batch_size=3, k=3))
    assert [r.input for r in results] == items
    assert [r.error is None for r in results] == [True, False, False, True]
    assert "not an image" in results[1].error and results[2].error
    for result in (results[0], results[3]):
        assert len(result.predictions) == 3
        assert all(p.label == str(p.index) and p.wnid is None for p in result.predictions)  # the model's own classes


def test_any_number_of_decoding_threads_gives_the_same_results_in_order(engine):
    """predict/evaluate (classify_batches) and classify decode on the same threads: same results, input order."""
    items = [str(p) for p in RGB_PHOTOS[:3]]
    batches = [[0, 1], [2]]
    one = [pair for batch in engine.classify_batches(items, batches, k=2, workers=1) for pair in batch]
    three = [pair for batch in engine.classify_batches(items, batches, k=2, workers=3) for pair in batch]
    assert [i for i, _ in one] == [0, 1, 2] and one == three
    assert [result for _, result in one] == list(engine.classify(items, batch_size=2, k=2))


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "'bogus' is not a device name: expected auto, cpu, cuda or cuda:N"),
        ("cuda:-1", "is not a device name"),
        ("meta", "'meta' cannot run the models"),
        ("xla", "'xla' cannot run the models"),
    ],
)
def test_a_device_that_cannot_run_is_a_value_error_that_says_so(device, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


@pytest.mark.slow
def test_an_input_that_raises_anything_gets_a_result_and_the_rest_are_classified(engine):
    items = [str(RGB_PHOTOS[0]), "~no-such-user-h13/photo.jpg", str(RGB_PHOTOS[1])]
    for workers in (1, 2):
        batches = engine.classify_batches(items, [[0, 1, 2]], k=3, workers=workers)
        results = [pair for batch in batches for pair in batch]
        assert [i for i, _ in results] == [0, 1, 2]
        assert results[1][1].error == "RuntimeError: Could not determine home directory."
        assert results[0][1].predictions and results[2][1].predictions


def test_top_k_above_the_class_count_is_every_class(engine):
    assert engine.clamp_k(3) == 3 and engine.clamp_k(2000) == 10
    [result] = engine.classify([str(RGB_PHOTOS[0])], k=engine.clamp_k(2000))
    assert sorted(p.index for p in result.predictions) == list(range(10))


def test_decoding_defaults_to_the_usable_cpus_never_more(engine, monkeypatch):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cpus() == cpus and engine.options.workers == InferenceOptions().workers <= cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus + 1))  # more torchrun processes on this machine than CPUs
    assert InferenceOptions().workers == 1


def test_classify_takes_its_top_k_from_the_options():
    model = build_model(ARCH, pretrained=False, num_classes=10)
    engine = Engine(model, InferenceOptions(device="cpu", precision="fp32", top_k=2000, batch_size=1, workers=1))
    results = list(engine.classify([str(RGB_PHOTOS[0]), str(RGB_PHOTOS[1])]))
    assert [len(r.predictions) for r in results] == [10, 10]  # top-2000 of 10 classes: all of them


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory):
    """A camera-like 1400x1050 JPEG: short side over four times a 256 resize, so decoded at half size."""
    from tools.camera_photos import camera_photo

    path = tmp_path_factory.mktemp("large") / "large.jpg"
    path.write_bytes(camera_photo(1, (1400, 1050)))
    return path


def test_inputs_decode_at_the_size_the_preset_needs_unless_exact(engine, large_photo):
    from resnext_hub.processing import load_image

    preset = engine.preprocessing
    assert engine.decode_size == preset.resize_size
    exact = Engine(
        build_model(ARCH, pretrained=False, num_classes=10),
        InferenceOptions(device="cpu", precision="fp32", exact_decode=True),
    )
    assert exact.decode_size is None
    items = [str(large_photo)]
    fast_expected = preset(load_image(large_photo, min_size=preset.resize_size))
    full_expected = preset(load_image(large_photo))
    assert not torch.equal(fast_expected, full_expected)  # the two decodes can be told apart
    (fast,) = engine.decoded(items, [[0]], workers=1)
    (full,) = exact.decoded(items, [[0]], workers=1)
    assert torch.equal(fast.images[0], fast_expected) and torch.equal(full.images[0], full_expected)


def test_threads_decode_the_next_batches_while_the_caller_holds_this_one(engine):
    import time

    from conftest import IMAGES
    from servers import FileServer

    with FileServer(IMAGES) as server:
        items = [f"{server.url}/{photo.name}" for photo in RGB_PHOTOS[:4]]
        batches = engine.decoded(items, [[0], [1], [2], [3]], workers=2)
        first = next(batches)
        assert first.indices == [0]
        # Batches 1 and 2 are asked for while batch 0 is held (PREFETCH_BATCHES; batch 3 may be too: it is queued
        # as 0 is handed over, and two workers' requests arrive in either order).
        wanted = {f"/{photo.name}" for photo in RGB_PHOTOS[:3]}
        deadline = time.monotonic() + 10
        while not wanted <= set(server.requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert wanted <= set(server.requests)
        assert [batch.indices for batch in batches] == [[1], [2], [3]]


def test_decoding_forks_no_process(engine):
    """Every command decodes on threads: no process is forked next to a runtime's thread pool (a DataLoader fork
    beside OpenVINO's left the parent to crash in a later malloc, seen in benchmarks.compare)."""
    import os

    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(os.getpid()))  # stays registered; counts nothing after this
    before = len(forks)
    items = [str(p) for p in RGB_PHOTOS[:3]]
    results = [pair for batch in engine.classify_batches(items, [[0, 1], [2]], k=2, workers=2) for pair in batch]
    assert len(results) == 3 and len(forks) == before
