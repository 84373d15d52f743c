"""The exported repository's Python-backend models under a real Triton server: preprocessing, postprocessing.

Served from a copy of the repository by PyTriton's ``tritonserver``, with the classifier swapped for a
stand-in running the same ``model.onnx`` with onnxruntime (tests/triton_servers.py); the preprocessing
and postprocessing models and the ensembles are served exactly as the export wrote them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from awkward_images import awkward_images
from conftest import IMAGES, RGB_PHOTOS, ROOT
from triton_servers import load_order, served_repository
from tritonclient.utils import InferenceServerException

from resnext_hub.models import build_model
from resnext_hub.processing import InvalidImageError, load_image
from resnext_hub.triton import contract, repository
from resnext_hub.triton.config import config_text, model_roles
from resnext_hub.triton.local import LocalTritonServer
from resnext_hub.triton.validation import read_config, validate_repository

ARCH = "seresnext26d_32x4d"
TOP_K = 5  # the triton_repo fixture's (export's default)
CONTRACT = contract.Contract(ARCH, 224, 1000, TOP_K)
ROLES = model_roles(CONTRACT)
PREPROCESS, ENSEMBLE = ROLES["preprocess"], ROLES["image"]
PHOTOS = [*RGB_PHOTOS, IMAGES / "camera.png"]  # four RGB JPEGs and a grayscale PNG

pytestmark = pytest.mark.slow  # an export, a subprocess and a real Triton server


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


@pytest.mark.slow  # exports a repository
def test_python_models_ship_the_projects_code(triton_repo, model):
    version = triton_repo / PREPROCESS / "1"
    shipped = version / "resnext_hub_image"
    # The loader, the preset's one implementation and the contract, byte for byte: Triton runs the project's code.
    sources = {"images.py": "processing/images.py", "fetch.py": "processing/fetch.py"}
    sources["transform.py"] = "processing/transform.py"
    sources["contract.py"] = Path(contract.__file__).relative_to(ROOT)
    for copy, source in sources.items():
        assert (shipped / copy).read_bytes() == (ROOT / source).read_bytes()
    backend = Path(repository.__file__).parent / "backend"
    assert (version / "model.py").read_bytes() == (backend / "preprocess.py").read_bytes()
    assert json.loads((version / "preset.json").read_text(encoding="utf-8")) == model.preprocessing.as_dict()
    for role in ("postprocess", "image_postprocess"):
        folder = triton_repo / ROLES[role] / "1"
        assert (folder / "model.py").read_bytes() == (backend / "postprocess.py").read_bytes()
        assert sorted(p.name for p in (folder / "resnext_hub_image").iterdir()) == ["__init__.py", "contract.py"]
        assert (folder / "resnext_hub_image" / "contract.py").read_bytes() == Path(contract.__file__).read_bytes()
        assert json.loads((folder / "labels.json").read_text(encoding="utf-8")) == list(model.classes.names)
    # What the Triton image must install, pinned as the project pins it.
    pins = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    for kind, role in (("preprocess", "preprocess"), ("postprocess", "postprocess")):
        shipped_requirements = (triton_repo / ROLES[role] / "1" / "requirements.txt").read_text().split()
        assert shipped_requirements == list(repository.REQUIREMENTS[kind]) and set(shipped_requirements) <= pins


# The shipped package as the Triton backend imports it, in an interpreter where torch cannot be imported.
TORCH_FREE = """
import importlib.abc, json, sys
from pathlib import Path


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is not installed in Triton's Python backend")


sys.meta_path.insert(0, Absent())
version, inputs, outputs = map(Path, sys.argv[1:])
sys.path.insert(0, str(version))
import numpy as np
from resnext_hub_image.images import load_image
from resnext_hub_image.transform import preprocess

preset = json.loads((version / "preset.json").read_text(encoding="utf-8"))
for path in inputs.iterdir():
    np.save(outputs / f"{path.name}.npy", preprocess(load_image(path.read_bytes()), preset))
"""


def test_the_shipped_code_runs_without_torch_and_gives_the_projects_tensors(triton_repo, model, tmp_path):
    """The awkward images (CMYK, 16-bit, palette, EXIF, LA, 1-bit, 1x4000, GIF) through the repository's copy."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    names = sorted(awkward_images())
    for i, name in enumerate(names):
        (inputs / str(i)).write_bytes(awkward_images()[name])
    version = triton_repo / PREPROCESS / "1"
    command = [sys.executable, "-c", TORCH_FREE, str(version), str(inputs), str(outputs)]
    subprocess.run(command, cwd=tmp_path, check=True, timeout=300)
    for i, name in enumerate(names):
        got = np.load(outputs / f"{i}.npy")
        np.testing.assert_array_equal(got, _expected(model, awkward_images()[name]), err_msg=name)


@pytest.fixture(scope="module")
def server(triton_repo, tmp_path_factory):
    """The exported repository with the stand-in classifier, on a real tritonserver; models loaded explicitly."""
    repo = served_repository(triton_repo, tmp_path_factory.mktemp("served") / "repo", CONTRACT, slow_preprocess=True)
    with LocalTritonServer(repo, log_path=tmp_path_factory.mktemp("triton-log") / "server.log") as local:
        local.load_seconds = local.load(load_order(validate_repository(repo)))
        print(f"model load times (s): {local.load_seconds}")
        yield local
        assert "Traceback" not in local.log_tail(100_000)


def _send(url: str, model_name: str, items: list[bytes]) -> dict[str, np.ndarray]:
    """Every output of ``model_name`` for one request holding ``items``."""
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    try:
        tensor = httpclient.InferInput(contract.IMAGE, [len(items), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[item] for item in items], dtype=object))
        result = client.infer(model_name, [tensor])
        return {output["name"]: result.as_numpy(output["name"]) for output in result.get_response()["outputs"]}
    finally:
        client.close()


def _statistics(url: str) -> tuple[int, int]:
    client = httpclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(PREPROCESS)["model_stats"][0]
    client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


@pytest.mark.slow  # exports a repository and starts a Triton server
def test_preprocessing_in_triton_equals_the_projects(server, model):
    """The photos and the awkward images (CMYK, 16-bit, palette, EXIF, LA, 1-bit, 1x4000, GIF): bit for bit."""
    encoded = [path.read_bytes() for path in PHOTOS] + list(awkward_images().values())
    expected = np.stack([_expected(model, data) for data in encoded])
    with ThreadPoolExecutor(len(encoded)) as pool:  # one request per image, batched by the server
        answers = list(pool.map(lambda data: _send(server.url, PREPROCESS, [data]), encoded))
    together = _send(server.url, PREPROCESS, encoded)  # one request holding every photo
    served = np.concatenate([answer[contract.INPUT] for answer in answers])
    assert served.shape == together[contract.INPUT].shape == (len(encoded), 3, 224, 224)
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, expected)
    np.testing.assert_array_equal(together[contract.INPUT], expected)
    assert together[contract.ERROR].tolist() == [[b""]] * len(encoded)


@pytest.mark.slow  # exports a repository and starts a Triton server
def test_bad_images_fail_alone_inside_a_batch(server, model):
    """Per sample: a bad image gets a placeholder and its reason, in its own request or in a shared one."""
    good = [path.read_bytes() for path in RGB_PHOTOS]
    bad = _bad_inputs()
    requests = [*good, *bad.values()]
    before = _statistics(server.url)
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda data: _send(server.url, PREPROCESS, [data]), requests))
    after = _statistics(server.url)
    together = _send(server.url, PREPROCESS, requests)  # one request holding good and bad images
    for i, data in enumerate(good):
        for got in (answers[i][contract.INPUT][0], together[contract.INPUT][i]):
            np.testing.assert_allclose(got, _expected(model, data), rtol=0, atol=1e-6)
        assert answers[i][contract.ERROR][0, 0] == together[contract.ERROR][i, 0] == b""
    for i, (what, data) in enumerate(bad.items(), len(good)):
        for got in (answers[i], {name: value[i : i + 1] for name, value in together.items()}):
            assert got[contract.ERROR][0, 0].decode() == _reason(data), what
            assert not got[contract.INPUT].any()  # the placeholder
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(requests)
    assert executions < len(requests)  # bad and good requests were executed together, and only the bad failed
    print(f"{len(requests)} requests ({len(bad)} bad) in {executions} model execution(s)")


@pytest.mark.slow  # exports a repository and starts a Triton server
def test_ensemble_answers_top_k_labels_from_image_bytes(server, model):
    encoded = [path.read_bytes() for path in PHOTOS]
    x = torch.from_numpy(np.stack([_expected(model, data) for data in encoded]))
    with torch.inference_mode():
        expected = model(x).softmax(1).topk(TOP_K)
    labels = model.classes.names
    for module, port in ((httpclient, server.http_port), (grpcclient, server.grpc_port)):
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = module.InferInput(contract.IMAGE, [len(encoded) + 1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data] for data in [*encoded, b""]], dtype=object))
        result = client.infer(ENSEMBLE, [tensor])
        client.close()
        got = {spec.name: result.as_numpy(spec.name) for spec in CONTRACT.outputs}
        assert got[contract.INDICES][:-1].tolist() == expected.indices.tolist(), module.__name__
        assert [[label.decode() for label in row] for row in got[contract.LABELS][:-1]] == [
            [labels[i] for i in row] for row in expected.indices.tolist()
        ]
        np.testing.assert_allclose(got[contract.PROBABILITIES][:-1], expected.values.numpy(), rtol=1e-4, atol=1e-6)
        # The empty file: its own reason and a blank top-k, the photos in the same request answered.
        assert got[contract.ERROR][:, 0].tolist() == [b""] * len(encoded) + [b"empty file"]
        assert got[contract.INDICES][-1].tolist() == [-1] * TOP_K and not got[contract.PROBABILITIES][-1].any()
        assert got[contract.LABELS][-1].tolist() == [b""] * TOP_K


@pytest.mark.slow  # exports a repository and starts a Triton server
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
