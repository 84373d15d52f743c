"""``serve``: a real Triton Inference Server (PyTriton) on 127.0.0.1, driven by tritonclient over HTTP and gRPC."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RGB_PHOTOS, ROOT
from triton_servers import TOKEN, ServeProcess, memory
from tritonclient.utils import InferenceServerException

from resnext_hub import cli
from resnext_hub.engine import Engine
from resnext_hub.models import build_model
from resnext_hub.models.finetuned import finetuned_checkpoint
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import ClassList, ImageClassification, InvalidImageError, load_image
from resnext_hub.triton.bundle import ServeUnavailableError, check_interpreter
from resnext_hub.triton.server import TOKEN_ENV
from tools.fake_checkpoints import random_state_dict

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
    """``serve`` with one fault injected (:data:`FAULTY_PRESET`, for 37x23 images only): one server start for the
    module's tests; the other servers of the tests run as users start them (``python -m resnext_hub serve``)."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    server = ServeProcess(ARCH, checkpoint, log, top_k=TOP_K, launcher=("-c", FAULTY_PRESET))
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


@pytest.mark.slow
def test_a_sample_that_raises_anything_fails_alone_in_its_request_and_its_batch(server, classifier):
    good = [p.read_bytes() for p in RGB_PHOTOS[:2]]
    samples = [good[0], _png((37, 23)), b"", good[1]]
    expected_errors = ["", "RuntimeError: fault injected for a 37x23 image", "empty file", ""]
    local = list(classifier.classify([str(p) for p in RGB_PHOTOS[:2]], k=TOP_K))

    def check(rows: dict, which: list[int]) -> None:
        for row, i in enumerate(which):
            assert rows["error"][row, 0].decode() == expected_errors[i]
            assert rows["indices"].shape[1] == TOP_K  # (a --top-k above the classes: test_triton_one_contract.py)
            if expected_errors[i]:
                assert (rows["indices"][row] == -1).all()
            else:
                top = local[0 if i == 0 else 1].predictions
                assert rows["indices"][row].tolist() == [p.index for p in top]
                np.testing.assert_allclose(rows["probabilities"][row], [p.probability for p in top], rtol=1e-4)

    # One request of four samples.
    tensor = httpclient.InferInput("image", [4, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[s] for s in samples], dtype=object))
    result = server.http.infer(f"{ARCH}_image", [tensor])
    check({name: result.as_numpy(name) for name in ("error", "indices", "probabilities")}, [0, 1, 2, 3])

    # Four one-sample requests at once over gRPC: batched together, none fails for another's sample.
    def send(i: int) -> dict:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        one = grpcclient.InferInput("image", [1, 1], "BYTES")
        one.set_data_from_numpy(np.array([[samples[i]]], dtype=object))
        answer = client.infer(f"{ARCH}_image", [one], client_timeout=120)
        client.close()
        return {name: answer.as_numpy(name) for name in ("error", "indices", "probabilities")}

    with ThreadPoolExecutor(4) as pool:
        for i, rows in enumerate(pool.map(send, range(4))):
            check(rows, [i])


@pytest.mark.slow
def test_server_stops_cleanly(server):
    assert server.stop() == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.http_port)) != 0  # nothing listens any more
    assert "Traceback" not in server.log_path.read_text()


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
def test_usage_errors_stop_serve_before_the_model_loads(options, message, capsys):
    # The checks are the same code in this process; the busy port is refused by serve run as users run it.
    as_process = "{busy}" in options
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = ["serve", "--checkpoint", "/nonexistent.pth"]
        argv += [option.format(busy=busy.getsockname()[1]) for option in options]
        if as_process:
            command = [sys.executable, "-m", "resnext_hub", *argv]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
            status, stderr = done.returncode, done.stderr
        else:
            status, stderr = cli.main(argv), capsys.readouterr().err
    assert status == 2, stderr
    assert message in stderr and "Traceback" not in stderr and "checkpoint" not in stderr


# -- issue 20: request cost bounded at the door, stalled clients, names that are not plain text, graceful stop ------

# Class names as a user's folders give them: accents, CJK, quotes and a comma, an emoji (names that are not valid
# text are refused when the class list is made: processing.labels). Served as UTF-8.
ODD_NAMES = ["café", "猫", 'a, "b"', "cat 🐱"]
ODD_LABELS = [name.encode() for name in ODD_NAMES]
LIMIT = 48 << 20  # --max-request-bytes: one 30 MB image passes, 96 MB does not
SMALL = ImageClassification(73, 64, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """A fine-tuned checkpoint (64 px) whose classes are :data:`ODD_NAMES`."""
    weights = random_state_dict(ARCH, seed=3, num_classes=len(ODD_NAMES))
    content = finetuned_checkpoint(weights, architecture=ARCH, classes=ClassList.of(ODD_NAMES), preprocessing=SMALL)
    path = tmp_path_factory.mktemp("odd") / "best.pth"
    torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def limited_server(odd_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("limited-serve-log") / "server.log"
    server = ServeProcess(ARCH, odd_checkpoint, log, top_k=4, options=["--max-request-bytes", "48M"])
    yield server
    assert server.stop() == 0
    assert "Traceback" not in log.read_text()


def _image_request(module, samples: list[bytes]):
    tensor = module.InferInput("image", [len(samples), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[sample] for sample in samples], dtype=object))
    return [tensor]


def _send_image(server: ServeProcess, protocol: str, samples: list[bytes]):
    if protocol == "http":
        client = httpclient.InferenceServerClient(server.url, network_timeout=120, connection_timeout=120)
        try:
            return client.infer(f"{ARCH}_image", _image_request(httpclient, samples))
        finally:
            client.close()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        return client.infer(f"{ARCH}_image", _image_request(grpcclient, samples), client_timeout=120)
    finally:
        client.close()


def _serving_processes(server: ServeProcess) -> dict[str, int]:
    """pid of serve and of tritonserver."""
    session = server.session()
    (triton,) = [pid for pid, name in session.items() if name == "tritonserver"]
    return {"serve": server.process.pid, "tritonserver": triton}


def test_memory_goes_back_after_large_requests(limited_server):
    """After a burst of large (allowed) requests, serve's process gives back what the allocator took for them."""
    large = b"\xff\xd8" + bytes(30 << 20)  # 30 MB, under the 40 MiB image cap: refused per sample, after decoding
    serve = limited_server.process.pid
    for protocol in ("http", "grpc"):  # warm up: the threads that forward and decode have run once
        _send_image(limited_server, protocol, [RGB_PHOTOS[0].read_bytes()])
    time.sleep(1)
    before, peak = memory(serve), memory(serve)
    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(_send_image, limited_server, ("http", "grpc")[i % 2], [large]) for i in range(8)]
        while not all(request.done() for request in burst):
            peak = {name: max(value, peak[name]) for name, value in memory(serve).items()}
            time.sleep(0.05)
    errors = [request.result().as_numpy("error")[0, 0].decode() for request in burst]
    assert all(error.startswith("not an image") for error in errors), errors
    time.sleep(2)  # serve releases freed memory 0.5 s and 1.5 s after a large batch
    after = memory(serve)
    mib = {name: (before[name] >> 20, peak[name] >> 20, after[name] >> 20) for name in after}
    assert peak["VmRSS"] - before["VmRSS"] > 30 << 20, f"MiB before, peak, after: {mib}"  # the burst was seen
    # The heap is back (the shared-memory pools PyTriton reuses for its tensors stay: RssShmem).
    assert after["RssAnon"] - before["RssAnon"] < 32 << 20, f"MiB before, peak, after: {mib}"


def test_a_request_over_the_limit_is_refused_before_triton_reads_it(limited_server):
    pids = _serving_processes(limited_server)
    before = {name: memory(pid)["VmRSS"] for name, pid in pids.items()}
    counted = int(limited_server.statistics(f"{ARCH}_image")["inference_count"])
    oversized = [b"\xff\xd8" + bytes(96 << 20)]
    with pytest.raises(InferenceServerException) as refused:
        _send_image(limited_server, "http", oversized)
    assert refused.value.status() == "413"
    assert f"over this server's limit of {LIMIT} bytes (serve --max-request-bytes)" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        _send_image(limited_server, "grpc", oversized)
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert re.search(rf"Received message larger than max \(\d+ vs\. {LIMIT}\)", refused.value.message())
    # Triton never saw them, and no process holds a copy of their bodies ...
    assert int(limited_server.statistics(f"{ARCH}_image")["inference_count"]) == counted
    grown = {name: (memory(pid)["VmRSS"] - before[name]) >> 20 for name, pid in pids.items()}
    assert all(mib < 48 for mib in grown.values()), f"MiB grown: {grown}"
    # ... which keeps serving.
    for protocol in ("http", "grpc"):
        answer = _send_image(limited_server, protocol, [RGB_PHOTOS[0].read_bytes()])
        assert answer.as_numpy("error")[0, 0] == b"" and answer.as_numpy("indices")[0, 0] >= 0


def test_stalled_clients_delay_no_one(limited_server):
    http_port, grpc_port = limited_server.http_port, limited_server.grpc_port
    stalled = [socket.create_connection(("127.0.0.1", port)) for port in (http_port, grpc_port)]  # send nothing
    stalled.append(socket.create_connection(("127.0.0.1", http_port)))
    stalled[-1].sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\n")  # half a head
    stalled.append(socket.create_connection(("127.0.0.1", http_port)))
    head = f"POST /v2/models/{ARCH}_image/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    stalled[-1].sendall(head.encode() + b'{"inputs"')  # a body that stops
    try:
        photo = RGB_PHOTOS[0].read_bytes()
        for protocol in ("http", "grpc", "http", "grpc"):
            started = time.monotonic()
            answer = _send_image(limited_server, protocol, [photo])
            assert answer.as_numpy("error")[0, 0] == b"" and time.monotonic() - started < 10, protocol
    finally:
        for connection in stalled:
            connection.close()


def test_class_names_that_are_not_plain_text_are_served_as_utf8(limited_server):
    x = np.zeros((1, 3, 64, 64), np.float32)
    client = httpclient.InferenceServerClient(limited_server.url)
    answers = []
    for binary in (True, False):  # BYTES as binary data, and as JSON strings
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("labels", "indices")]
        answers.append(client.infer(ARCH, _tensor_request("http", x), outputs=outputs))
    client.close()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{limited_server.grpc_port}")
    answers.append(client.infer(ARCH, _tensor_request("grpc", x), client_timeout=120))
    client.close()
    for answer in answers:
        indices = answer.as_numpy("indices")[0].tolist()
        assert sorted(indices) == [0, 1, 2, 3]
        labels = [label if isinstance(label, bytes) else label.encode() for label in answer.as_numpy("labels")[0]]
        assert labels == [ODD_LABELS[i] for i in indices]


@pytest.fixture
def slow_server(small_checkpoint, tmp_path):
    """A server whose batches wait 8 s for company (preferred size 8, never reached by one request): longer than
    Triton's own exit timeout (5 s), so only a stop that waits for the requests in flight answers them."""
    options = ["--max-batch-size", "8", "--preferred-batch-sizes", "8", "--queue-delay-us", "8000000"]
    server = ServeProcess(ARCH, small_checkpoint, tmp_path / "server.log", top_k=TOP_K, options=options)
    yield server
    server.stop()


def test_sigterm_finishes_the_requests_in_flight_then_every_process_ends(slow_server, classifier):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).numpy()
    expected = [[p.index for p in row] for row in classifier.top_k(torch.from_numpy(x), TOP_K)]
    assert len(slow_server.session()) > 2  # serve, tritonserver, its stubs, ...

    def send(protocol: str) -> list[int]:
        i = 0 if protocol == "http" else 1
        if protocol == "http":
            client = httpclient.InferenceServerClient(slow_server.url, network_timeout=120)
            answer = client.infer(ARCH, _tensor_request("http", x[i : i + 1]))
        else:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{slow_server.grpc_port}")
            answer = client.infer(ARCH, _tensor_request("grpc", x[i : i + 1]), client_timeout=120)
        client.close()
        return answer.as_numpy("indices")[0].tolist()

    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(send, protocol) for protocol in ("http", "grpc")]
        time.sleep(1.5)  # both wait in Triton's queue
        assert not any(request.done() for request in in_flight)
        slow_server.process.send_signal(signal.SIGTERM)
        assert [request.result(timeout=60) for request in in_flight] == expected  # answered, not cut
    assert slow_server.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while slow_server.session() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slow_server.session() == {}  # tritonserver, stubs, helpers: none left
    assert "Traceback" not in slow_server.log_path.read_text()
