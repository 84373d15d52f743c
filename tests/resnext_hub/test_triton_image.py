"""The exported repository's image path under a real Triton server: preprocessing model and ensemble.

PyTriton's bundled ``tritonserver`` (resnext_hub.triton_local) has Triton's Python backend but not its
ONNX Runtime backend, so the classifier is served by a Python stand-in that runs the same exported
``model.onnx`` with onnxruntime (triton_onnx_standin.py). The preprocessing model and the ensemble are
served exactly as the export wrote them, from a copy of the repository in a temporary folder.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import IMAGES, RGB_PHOTOS, ROOT
from PIL import Image
from tritonclient.utils import InferenceServerException

from resnext_hub.export import triton_repository
from resnext_hub.export.triton_image import transform
from resnext_hub.models import build_model
from resnext_hub.processing import InvalidImageError, load_image
from resnext_hub.processing import presets as project_presets
from resnext_hub.processing.presets import manifest_presets
from resnext_hub.triton import config_text, read_config, validate_repository
from resnext_hub.triton_local import LocalTritonServer

ARCH = "seresnext26d_32x4d"
PREPROCESS, ENSEMBLE = f"{ARCH}_preprocess", f"{ARCH}_image"
TOP_K = 5
PHOTOS = [*RGB_PHOTOS, IMAGES / "camera.png"]  # four RGB JPEGs and a grayscale PNG
STANDIN = Path(__file__).resolve().parent / "triton_onnx_standin.py"


def _bad_inputs() -> dict[str, bytes]:
    jpeg = RGB_PHOTOS[0].read_bytes()
    return {
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "HTML page": b"<!doctype html><html><head><title>404</title></head><body>Not Found</body></html>",
        "zero bytes": b"",
    }


def _reason(data: bytes) -> str:
    with pytest.raises(InvalidImageError) as caught:
        load_image(data)
    return caught.value.reason


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return build_model(ARCH, pretrained_from_file=small_checkpoint)


def _expected(model, data: bytes) -> np.ndarray:
    """The project's own preprocessing of encoded bytes."""
    return model.preprocessing(load_image(data)).numpy()


@pytest.mark.slow
def test_transform_equals_the_presets():
    """The shipped torch-free transform against the project's presets: every preset, photos and odd shapes."""
    assert transform.MAX_STRETCH == project_presets._MAX_STRETCH
    rng = np.random.default_rng(0)
    shapes = [(10, 2000), (2000, 7), (3, 5000), (256, 256), (300, 257), (255, 900), (224, 224), (1, 1)]
    images = [load_image(path) for path in PHOTOS]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    for name, preset in manifest_presets().items():
        for image in images:
            expected = preset(image).numpy()
            got = transform.preprocess(image, preset.as_dict())
            assert got.dtype == np.float32 and got.shape == expected.shape, (name, image.size)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{name} {image.size}")


@pytest.mark.slow
def test_preprocessing_model_ships_the_projects_code(triton_repo, model):
    version = triton_repo / PREPROCESS / "1"
    shipped = version / "resnext_hub_image"
    for copy, source in (("images.py", "processing/images.py"), ("fetch.py", "processing/fetch.py")):
        assert (shipped / copy).read_bytes() == (ROOT / source).read_bytes()
    assert (shipped / "transform.py").read_bytes() == Path(transform.__file__).read_bytes()
    assert (version / "model.py").read_bytes() == (Path(transform.__file__).parent / "model.py").read_bytes()
    assert json.loads((version / "preset.json").read_text(encoding="utf-8")) == model.preprocessing.as_dict()
    # What the Triton image must install, pinned as the project pins it.
    pins = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    shipped_requirements = (version / "requirements.txt").read_text().split()
    assert shipped_requirements == list(triton_repository.REQUIREMENTS) and set(shipped_requirements) <= pins


@pytest.fixture(scope="module")
def server(triton_repo, tmp_path_factory):
    """The exported repository with the stand-in classifier, on a real tritonserver; models loaded explicitly."""
    repo = tmp_path_factory.mktemp("served") / "repo"
    shutil.copytree(triton_repo, repo)
    classifier = read_config(repo / ARCH / "config.pbtxt")
    classifier.platform, classifier.backend = "", "python"
    classifier.instance_group[0].count = 1
    (repo / ARCH / "config.pbtxt").write_text(config_text(classifier))
    shutil.copyfile(STANDIN, repo / ARCH / "1" / "model.py")
    # One instance and a long queue delay without preferred sizes: requests sent together form one batch.
    preprocess = read_config(repo / PREPROCESS / "config.pbtxt")
    preprocess.instance_group[0].count = 1
    preprocess.dynamic_batching.ClearField("preferred_batch_size")
    preprocess.dynamic_batching.max_queue_delay_microseconds = 1_000_000
    (repo / PREPROCESS / "config.pbtxt").write_text(config_text(preprocess))
    validate_repository(repo)
    with LocalTritonServer(repo, log_path=tmp_path_factory.mktemp("triton-log") / "server.log") as local:
        local.load_seconds = local.load([PREPROCESS, ARCH, ENSEMBLE])
        print(f"model load times (s): {local.load_seconds}")
        yield local
        assert "Traceback" not in local.log_tail(100_000)


def _send(url: str, model_name: str, items: list[bytes]):
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    try:
        tensor = httpclient.InferInput("image", [len(items), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[item] for item in items], dtype=object))
        return client.infer(model_name, [tensor]).as_numpy("input")
    except InferenceServerException as error:
        return error
    finally:
        client.close()


def _statistics(url: str) -> tuple[int, int]:
    client = httpclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(PREPROCESS)["model_stats"][0]
    client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


@pytest.mark.slow
def test_preprocessing_in_triton_equals_the_projects(server, model):
    encoded = [path.read_bytes() for path in PHOTOS]
    expected = np.stack([_expected(model, data) for data in encoded])
    with ThreadPoolExecutor(len(encoded)) as pool:  # one request per photo, batched by the server
        answers = list(pool.map(lambda data: _send(server.url, PREPROCESS, [data]), encoded))
    together = _send(server.url, PREPROCESS, encoded)  # one request holding every photo
    for got in [*answers, together]:
        assert not isinstance(got, Exception), got
    served = np.concatenate(answers)
    assert served.shape == together.shape == (len(PHOTOS), 3, 224, 224) and served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(together, expected, rtol=0, atol=1e-6)
    print(f"preprocessing in Triton vs the project's: max |diff| {np.abs(served - expected).max():.2e}")


@pytest.mark.slow
def test_bad_images_fail_alone_inside_a_batch(server, model):
    good = [path.read_bytes() for path in RGB_PHOTOS]
    bad = _bad_inputs()
    requests = [*good, *bad.values()]
    before = _statistics(server.url)
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda data: _send(server.url, PREPROCESS, [data]), requests))
    after = _statistics(server.url)
    for data, got in zip(good, answers):
        np.testing.assert_allclose(got[0], _expected(model, data), rtol=0, atol=1e-6)
    for (what, data), got in zip(bad.items(), answers[len(good) :]):
        assert isinstance(got, InferenceServerException), what
        assert f"image 0 of the request: {_reason(data)}" in str(got), (what, str(got))
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(requests)
    assert executions < len(requests)  # bad and good requests were executed together, and only the bad failed
    print(f"{len(requests)} requests ({len(bad)} bad) in {executions} model execution(s)")


@pytest.mark.slow
def test_ensemble_answers_top_k_labels_from_image_bytes(server, model):
    encoded = [path.read_bytes() for path in PHOTOS]
    x = torch.from_numpy(np.stack([_expected(model, data) for data in encoded]))
    with torch.inference_mode():
        expected = model(x).softmax(1).topk(TOP_K)
    labels = model.classes.names
    for module, port in ((httpclient, server.http_port), (grpcclient, server.grpc_port)):
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = module.InferInput("image", [len(encoded), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data] for data in encoded], dtype=object))
        wanted = module.InferRequestedOutput("probabilities", class_count=TOP_K)  # classification extension
        rows = client.infer(ENSEMBLE, [tensor], outputs=[wanted]).as_numpy("probabilities")
        assert rows.shape == (len(encoded), TOP_K)
        for row, values, indices in zip(rows, expected.values, expected.indices):
            parsed = [item.decode().split(":", 2) for item in row]  # "value:index:label", best first
            assert [int(index) for _, index, _ in parsed] == indices.tolist(), module.__name__
            assert [label for _, _, label in parsed] == [labels[i] for i in indices]
            # Triton writes the value with 6 decimals.
            np.testing.assert_allclose([float(v) for v, _, _ in parsed], values.numpy(), rtol=1e-4, atol=1e-6)
        with pytest.raises(InferenceServerException, match="empty file"):  # a bad image: that request's error
            bad = module.InferInput("image", [1, 1], "BYTES")
            bad.set_data_from_numpy(np.array([[b""]], dtype=object))
            client.infer(ENSEMBLE, [bad])
        client.close()


@pytest.mark.slow
def test_a_preprocessing_model_that_disagrees_with_its_preset_does_not_load(server):
    broken = server.repository / f"{PREPROCESS}_broken"
    shutil.copytree(server.repository / PREPROCESS, broken)
    config = read_config(broken / "config.pbtxt")
    config.name = broken.name
    del config.output[0].dims[1:]
    config.output[0].dims.extend([64, 64])
    (broken / "config.pbtxt").write_text(config_text(config))
    with pytest.raises(InferenceServerException, match=r"preset.json gives \[3, 224, 224\]"):
        server.load([broken.name])
