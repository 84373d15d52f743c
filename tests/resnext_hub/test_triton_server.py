"""``serve``: a real Triton Inference Server (PyTriton) on 127.0.0.1, driven by tritonclient over HTTP and gRPC."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RGB_PHOTOS, ROOT
from triton_servers import TOKEN, ServeProcess
from tritonclient.utils import InferenceServerException

from resnext_hub import cli
from resnext_hub.engine import Engine
from resnext_hub.models import build_model
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import InvalidImageError, load_image
from resnext_hub.triton.bundle import ServeUnavailableError, check_interpreter
from resnext_hub.triton.server import TOKEN_ENV

pytestmark = pytest.mark.slow  # every test here starts a server or a subprocess

ARCH = "seresnext26d_32x4d"
TOP_K = 3


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return Engine(build_model(ARCH, pretrained_from_file=checkpoint), InferenceOptions(device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    server = ServeProcess(ARCH, checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log", top_k=TOP_K)
    yield server
    server.stop()


def test_interpreter_check(capsys):
    assert cli.main(["serve", "--check"]) == 0
    assert f"PyTriton can serve with this interpreter: Python {sys.version.split()[0]}" in capsys.readouterr().out
    library = check_interpreter()
    assert library.is_file() and library.name.startswith(f"libpython{sys.version_info[0]}.{sys.version_info[1]}")
    # The pyenv case found on this machine: 3.11.7 running beside Debian's 3.11.2 shared library.
    wrong = f"{sys.version_info[0]}.{sys.version_info[1]}.99"
    with pytest.raises(ServeUnavailableError, match=rf"\(Python {sys.version.split()[0]}\).* is Python {wrong}"):
        check_interpreter(wrong)
    with pytest.raises(ServeUnavailableError, match=r"stubs for Python \[.*\], not 2\.7"):
        check_interpreter("2.7.18")


def _tensor_request(protocol, x: np.ndarray):
    module = httpclient if protocol == "http" else grpcclient
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


@pytest.mark.slow
def test_concurrent_http_and_grpc_requests_match_local_inference_and_are_batched(server, classifier):
    before = server.statistics(ARCH)
    inputs = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)).numpy()

    def send(i: int):
        x = inputs[i : i + 1]
        if i % 2:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            result = client.infer(ARCH, _tensor_request("grpc", x), client_timeout=120)
        else:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=120)
            result = client.infer(ARCH, _tensor_request("http", x))
        client.close()
        return {name: result.as_numpy(name)[0] for name in ("labels", "probabilities", "indices", "error")}

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(len(inputs))))
    expected = classifier.top_k(torch.from_numpy(inputs), TOP_K)
    for answer, local in zip(answers, expected):
        assert answer["error"].tolist() == [b""]  # the contract's error output: empty, the sample was answered
        assert answer["indices"].tolist() == [p.index for p in local]
        assert [label.decode() for label in answer["labels"]] == [p.label for p in local]
        np.testing.assert_allclose(answer["probabilities"], [p.probability for p in local], rtol=1e-4, atol=1e-6)
    after = server.statistics(ARCH)
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == len(inputs)
    assert executions < requests  # the dynamic batcher put several requests into one model execution


@pytest.mark.slow
def test_encoded_images_are_decoded_with_the_hardened_loader(server, classifier):
    photos = RGB_PHOTOS[:2]
    bad = b"GIF89a but not really"
    with pytest.raises(InvalidImageError) as local_error:
        load_image(bad)
    payload = np.array([[p.read_bytes()] for p in photos] + [[bad]], dtype=object)
    expected = list(classifier.classify([str(p) for p in photos], k=TOP_K))
    for protocol, module, port in (("http", httpclient, server.http_port), ("grpc", grpcclient, server.grpc_port)):
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = module.InferInput("image", [len(payload), 1], "BYTES")
        tensor.set_data_from_numpy(payload)
        result = client.infer(f"{ARCH}_image", [tensor])
        client.close()
        errors = [e.decode() for e in result.as_numpy("error")[:, 0]]
        assert errors[:2] == ["", ""], protocol
        assert errors[2] == local_error.value.reason  # the same loader, the same verdict
        for row, local in enumerate(expected):
            assert result.as_numpy("indices")[row].tolist() == [p.index for p in local.predictions], protocol
            np.testing.assert_allclose(
                result.as_numpy("probabilities")[row], [p.probability for p in local.predictions], rtol=1e-4
            )
        assert result.as_numpy("indices")[2].tolist() == [-1] * TOP_K


@pytest.mark.slow
def test_wrong_input_shape_is_refused_by_the_server(server):
    with pytest.raises(InferenceServerException, match="input"):
        server.http.infer(ARCH, _tensor_request("http", np.zeros((1, 3, 64, 64), np.float32)))
    with pytest.raises(InferenceServerException, match="403"):
        server.http.get_inference_statistics(ARCH)  # admin endpoints need the token


@pytest.mark.slow
def test_load_script_reports_throughput_and_latency(server):
    argv = [sys.executable, "-m", "benchmarks.triton_load", "--model", ARCH, "--json"]
    argv += ["--url", f"127.0.0.1:{server.http_port}", "--concurrency", "1,4", "--requests", "8"]
    env = {**os.environ, TOKEN_ENV: TOKEN}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    levels = [json.loads(line) for line in done.stdout.splitlines()]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 8 and level["throughput_per_s"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
    assert levels[1]["mean_batch"] > 1  # four clients at once are batched together


@pytest.mark.slow
def test_server_stops_cleanly(server):
    assert server.stop() == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.http_port)) != 0  # nothing listens any more
    assert "Traceback" not in server.log_path.read_text()


# -- issue 13: one bad sample fails alone; usage errors before anything starts -----------------------------------

# `python -m resnext_hub serve`, with one deterministic fault: the preset raises for a 37x23 image, something the
# hardened loader never raises (an unexpected exception type inside preprocessing).
FAULTY_PRESET = """
import runpy, sys
from resnext_hub.processing.presets import ImageClassification
preprocess = ImageClassification.__call__
def faulty(self, image):
    if image.size == (37, 23):
        raise RuntimeError("fault injected for a 37x23 image")
    return preprocess(self, image)
ImageClassification.__call__ = faulty
sys.argv = ["resnext_hub", *sys.argv[1:]]
runpy.run_module("resnext_hub", run_name="__main__", alter_sys=True)
"""


def _png(size) -> bytes:
    import io

    from PIL import Image

    encoded = io.BytesIO()
    Image.new("RGB", size, "blue").save(encoded, "PNG")
    return encoded.getvalue()


@pytest.fixture(scope="module")
def faulty_server(checkpoint, tmp_path_factory):
    """A server with the faulty preset and --top-k 2000 (above the 1000 classes: all of them)."""
    log = tmp_path_factory.mktemp("faulty-serve-log") / "server.log"
    server = ServeProcess(ARCH, checkpoint, log, top_k=2000, launcher=("-c", FAULTY_PRESET))
    yield server
    assert server.stop() == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_a_sample_that_raises_anything_fails_alone_in_its_request_and_its_batch(faulty_server, classifier):
    good = [p.read_bytes() for p in RGB_PHOTOS[:2]]
    samples = [good[0], _png((37, 23)), b"", good[1]]
    expected_errors = ["", "RuntimeError: fault injected for a 37x23 image", "empty file", ""]
    local = list(classifier.classify([str(p) for p in RGB_PHOTOS[:2]], k=5))

    def check(rows: dict, which: list[int]) -> None:
        for row, i in enumerate(which):
            assert rows["error"][row, 0].decode() == expected_errors[i]
            assert rows["indices"].shape[1] == 1000  # --top-k 2000 is every class
            if expected_errors[i]:
                assert (rows["indices"][row] == -1).all()
            else:
                top = local[0 if i == 0 else 1].predictions
                assert rows["indices"][row, :5].tolist() == [p.index for p in top]
                np.testing.assert_allclose(rows["probabilities"][row, :5], [p.probability for p in top], rtol=1e-4)

    # One request of four samples.
    tensor = httpclient.InferInput("image", [4, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[s] for s in samples], dtype=object))
    result = faulty_server.http.infer(f"{ARCH}_image", [tensor])
    check({name: result.as_numpy(name) for name in ("error", "indices", "probabilities")}, [0, 1, 2, 3])

    # Four one-sample requests at once over gRPC: batched together, none fails for another's sample.
    def send(i: int) -> dict:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{faulty_server.grpc_port}")
        one = grpcclient.InferInput("image", [1, 1], "BYTES")
        one.set_data_from_numpy(np.array([[samples[i]]], dtype=object))
        answer = client.infer(f"{ARCH}_image", [one], client_timeout=120)
        client.close()
        return {name: answer.as_numpy(name) for name in ("error", "indices", "probabilities")}

    with ThreadPoolExecutor(4) as pool:
        for i, rows in enumerate(pool.map(send, range(4))):
            check(rows, [i])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--http-port", "70000"], "--http-port must be in 1..65535, got 70000"),
        (["--http-port", "8500", "--grpc-port", "8500"], "the ports must differ"),
        (
            ["--max-batch-size", "4", "--preferred-batch-sizes", "4,8"],
            "--preferred-batch-sizes [8] are outside 1..--max",
        ),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--queue-delay-us", "-1"], "--queue-delay-us must be at least 0"),
        (["--name", "a/b"], "--name 'a/b' is not a model name"),
        (["--device", "bogus"], "--device: device 'bogus' is not a device name"),
        (["--http-port", "{busy}"], "Address already in use): pass another --http-port"),
    ],
)
def test_usage_errors_stop_serve_before_the_model_loads(options, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        options = [option.format(busy=busy.getsockname()[1]) for option in options]
        argv = [sys.executable, "-m", "resnext_hub", "serve", "--checkpoint", "/nonexistent.pth", *options]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr and "checkpoint" not in done.stderr
