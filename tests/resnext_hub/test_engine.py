"""The inference engine: devices, the fast path, decoding in threads or loader processes, errors as results."""

from __future__ import annotations

import pytest
import torch
from conftest import RGB_PHOTOS

from resnext_hub.engine import Engine, resolve_device
from resnext_hub.models import build_model

ARCH = "seresnext26d_32x4d"


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(build_model(ARCH, pretrained=False, num_classes=10), device="cpu", precision="fp32")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


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


def test_loader_processes_and_threads_give_the_same_results(engine):
    items = [str(p) for p in RGB_PHOTOS[:3]]
    batches = [[0, 1], [2]]
    threaded = [pair for batch in engine.classify_batches(items, batches, k=2, threads=True) for pair in batch]
    loaded = [pair for batch in engine.classify_batches(items, batches, k=2, workers=1) for pair in batch]
    assert [i for i, _ in loaded] == [0, 1, 2] and loaded == threaded
