"""One client, two servers: ``serve`` and the exported repository answer the same Triton contract.

A checkpoint with its own classes (as ``finetune`` writes ``best.pth``) is served by ``python -m
resnext_hub serve`` and exported by ``python -m resnext_hub export --format triton``; the repository
runs on PyTriton's real ``tritonserver`` (the classifier on the onnxruntime stand-in,
tests/triton_servers.py). The same client code, over HTTP and gRPC, gets the same models, outputs,
dtypes and shapes from both, the user's class names, and per-sample errors for bad images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RGB_PHOTOS
from triton_servers import ServeProcess, load_order, served_repository

from resnext_hub import cli
from resnext_hub.models import build_model
from resnext_hub.models.finetuned import finetuned_checkpoint
from resnext_hub.processing import ClassList, ImageClassification, InvalidImageError, load_image
from resnext_hub.triton.contract import NON_FINITE, Contract
from resnext_hub.triton.local import LocalTritonServer
from resnext_hub.triton.validation import validate_repository
from tools.fake_checkpoints import random_state_dict

pytestmark = pytest.mark.slow  # starts both servers

ARCH = "seresnext26d_32x4d"
# The user's classes, as folders give them: accents, CJK, quotes, a comma and an emoji (names that are not valid
# text are refused when the class list is made: processing.labels); both servers answer them as the same UTF-8.
NAMES = ["café", "猫", 'a, "b" 🐱']
LABELS = [name.encode() for name in NAMES]
PRESET = ImageClassification(73, 64, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # small and fast
CONTRACT = Contract(ARCH, 64, len(NAMES), len(NAMES))  # --top-k 5 served: clamped to the 3 classes
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fine-tuned checkpoint, as ``finetune`` writes ``best.pth``: weights, architecture, class names, preset."""
    weights = random_state_dict(ARCH, seed=11, num_classes=len(NAMES))
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=PRESET)
    path = tmp_path_factory.mktemp("finetuned") / "best.pth"
    torch.save({**content, "epoch": 1, "metrics": {"val_top1": 50.0}}, path)
    return path


@pytest.fixture(scope="module")
def model(finetuned):
    return build_model(ARCH, pretrained_from_file=finetuned)


@pytest.fixture(scope="module")
def servers(finetuned, tmp_path_factory):
    """``{"serve": (http url, grpc url), "exported": (...)}``, both ready."""
    exported = tmp_path_factory.mktemp("exported") / "repo"
    argv = ["export", "--model", ARCH, "--checkpoint", str(finetuned), "--format", "triton", "-o", str(exported)]
    assert cli.main([*argv, "--max-batch-size", "8", "--preferred-batch-sizes", "4", "--instance-kind", "cpu"]) == 0
    served = served_repository(exported, tmp_path_factory.mktemp("served") / "repo", CONTRACT)
    logs = tmp_path_factory.mktemp("logs")
    serve = ServeProcess(ARCH, finetuned, logs / "serve.log", top_k=5)
    try:
        with LocalTritonServer(served, log_path=logs / "triton.log") as local:
            local.load(load_order(validate_repository(served)))
            yield {
                "serve": (serve.url, f"127.0.0.1:{serve.grpc_port}"),
                "exported": (local.url, f"127.0.0.1:{local.grpc_port}"),
            }
            assert "Traceback" not in local.log_tail(100_000)
    finally:
        assert serve.stop() == 0


# -- the client: the same code for both servers ---------------------------------------------------------------


def _metadata(url: str, protocol: str, model: str) -> dict:
    client = PROTOCOLS[protocol].InferenceServerClient(url)
    try:
        found = client.get_model_metadata(model, **({"as_json": True} if protocol == "grpc" else {}))
    finally:
        client.close()
    return {
        side: sorted((t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in found[side])
        for side in ("inputs", "outputs")
    }


def _infer(url: str, protocol: str, model: str, name: str, batch: np.ndarray, datatype: str) -> dict[str, np.ndarray]:
    """Every output the server answers, by name."""
    module = PROTOCOLS[protocol]
    client = module.InferenceServerClient(url, **({"network_timeout": 120} if protocol == "http" else {}))
    try:
        tensor = module.InferInput(name, list(batch.shape), datatype)
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], **({"client_timeout": 120} if protocol == "grpc" else {}))
        response = result.get_response(**({"as_json": True} if protocol == "grpc" else {}))
        return {output["name"]: result.as_numpy(output["name"]) for output in response["outputs"]}
    finally:
        client.close()


def _shapes(answer: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {name: (value.dtype.kind, value.shape) for name, value in answer.items()}


# -- the tests --------------------------------------------------------------------------------------------------


def test_both_servers_publish_the_contracts_models(servers):
    for model in CONTRACT.models:
        expected = {
            "inputs": sorted((s.name, s.datatype, (-1, *s.dims)) for s in model.inputs),
            "outputs": sorted((s.name, s.datatype, (-1, *s.dims)) for s in model.outputs),
        }
        for server, (http_url, grpc_url) in servers.items():
            assert _metadata(http_url, "http", model.name) == expected, (server, model.name)
            assert _metadata(grpc_url, "grpc", model.name) == expected, (server, model.name)


def test_tensors_get_the_same_answer_with_the_users_classes(servers, model):
    photos = torch.stack([PRESET(load_image(path)) for path in RGB_PHOTOS[:2]]).numpy()
    nan = np.full((1, 3, 64, 64), np.nan, np.float32)
    batch = np.concatenate([photos, nan])
    with torch.inference_mode():
        expected = model(torch.from_numpy(photos)).softmax(1).topk(CONTRACT.k)
    answers = {}
    for server, urls in servers.items():
        for protocol, url in zip(PROTOCOLS, urls):
            answers[server, protocol] = _infer(url, protocol, ARCH, "input", batch, "FP32")
    first = answers["serve", "http"]
    shapes = {"labels": ("O", (3, 3)), "probabilities": ("f", (3, 3)), "indices": ("i", (3, 3)), "error": ("O", (3, 1))}
    assert _shapes(first) == shapes
    for where, answer in answers.items():
        assert _shapes(answer) == _shapes(first) and sorted(answer) == sorted(first), where
        assert answer["indices"][:2].tolist() == expected.indices.tolist(), where
        assert answer["labels"][:2].tolist() == [[LABELS[i] for i in row] for row in expected.indices.tolist()], where
        np.testing.assert_allclose(answer["probabilities"][:2], expected.values.numpy(), rtol=1e-4, atol=1e-6)
        # The NaN sample: its own error, a blank top-k; the photos beside it answered.
        assert answer["error"][:, 0].tolist() == [b"", b"", NON_FINITE.encode()], where
        assert answer["indices"][2].tolist() == [-1] * 3 and answer["labels"][2].tolist() == [b""] * 3, where


def _reason(data: bytes) -> str:
    with pytest.raises(InvalidImageError) as caught:
        load_image(data)
    return caught.value.reason


def test_bad_images_get_their_own_error_and_the_rest_is_answered(servers):
    jpeg = RGB_PHOTOS[0].read_bytes()
    junk = b"\xff\xd8" + bytes(64)  # its reason quotes bytes with backslashes: sent as they are, by both
    samples = [jpeg, jpeg[: len(jpeg) // 2], RGB_PHOTOS[1].read_bytes(), b"", junk]  # truncated JPEG, zero bytes
    batch = np.array([[sample] for sample in samples], dtype=object)
    expected_errors = ["", _reason(samples[1]), "", "empty file", _reason(junk)]
    assert "\\x" in expected_errors[4]
    answers = {}
    for server, urls in servers.items():
        for protocol, url in zip(PROTOCOLS, urls):
            answers[server, protocol] = _infer(url, protocol, f"{ARCH}_image", "image", batch, "BYTES")
    first = answers["serve", "http"]
    for where, answer in answers.items():
        assert _shapes(answer) == _shapes(first) and sorted(answer) == sorted(first), where
        assert [error.decode() for error in answer["error"][:, 0]] == expected_errors, where
        for row in (1, 3, 4):  # blank
            assert answer["indices"][row].tolist() == [-1] * 3 and not answer["probabilities"][row].any(), where
            assert answer["labels"][row].tolist() == [b""] * 3, where
        for row in (0, 2):  # answered, with the user's class names, as by the other server
            assert answer["indices"][row].tolist() == first["indices"][row].tolist(), where
            assert answer["labels"][row].tolist() == [LABELS[i] for i in answer["indices"][row]], where
            np.testing.assert_allclose(answer["probabilities"][row], first["probabilities"][row], rtol=1e-4, atol=1e-6)
