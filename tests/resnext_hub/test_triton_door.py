"""``serve``'s front door (resnext_hub.triton.door) in front of real loopback servers, HTTP and gRPC.

The upstream here is a small echo server of each protocol (it says how many bytes each request
brought it, and counts the requests that reached it), so what the door forwards, refuses, times out
and drains can be seen exactly; tests/resnext_hub/test_triton_server.py runs it in front of Triton.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from resnext_hub import cli
from resnext_hub.commands.serve import parse_byte_count
from resnext_hub.processing.images import MAX_BYTES, MAX_BYTES_ENV
from resnext_hub.triton.door import GRPC_MESSAGE_CAP, GRPC_STREAM_METHOD, Door
from resnext_hub.triton.local import free_port
from resnext_hub.triton.server import default_max_request_bytes

LIMIT = 1 << 20
TIMEOUT_S = 1.5  # the door's idle and body timeouts here


class _Echo(BaseHTTPRequestHandler):
    """Answers ``{"bytes": <body length>, "headers": {...}}`` after ``server.delay_s``; counts requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while line := self.rfile.readline():
            if not (size := int(line.strip(), 16)):
                self.rfile.readline()
                return body
            body += self.rfile.read(size)
            self.rfile.readline()
        raise ConnectionError("the body was cut")

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests += 1
        try:
            body = self._body()
        except ConnectionError:  # the door cut a body that went over the limit
            self.close_connection = True
            return
        time.sleep(self.server.delay_s)
        reply = json.dumps({"bytes": len(body), "path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST


class _GrpcEcho(grpc.GenericRpcHandler):
    """Unary calls answer the request's length and the ``token`` metadata; the stream echoes lengths."""

    def __init__(self) -> None:
        self.requests = 0

    def service(self, details):
        if details.method == GRPC_STREAM_METHOD:
            return grpc.stream_stream_rpc_method_handler(lambda requests, _: (b"%d" % len(r) for r in requests))

        def unary(request: bytes, context) -> bytes:
            self.requests += 1
            if request == b"fail":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "upstream says no")
            token = dict(context.invocation_metadata()).get("token", "")
            return f"{len(request)} {token}".encode()

        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
def upstream():
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    http_server.requests, http_server.delay_s = 0, 0.0
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    echo = _GrpcEcho()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", -1)])
    grpc_server.add_generic_rpc_handlers((echo,))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield http_server, grpc_server, grpc_port, echo
    grpc_server.stop(0)
    http_server.shutdown()
    http_server.server_close()


@pytest.fixture
def door(upstream):
    http_server, _, grpc_port, _ = upstream
    door = Door(
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        upstream_http=f"127.0.0.1:{http_server.server_address[1]}",
        upstream_grpc=f"127.0.0.1:{grpc_port}",
        max_request_bytes=LIMIT,
        idle_timeout_s=TIMEOUT_S,
        body_timeout_s=TIMEOUT_S,
    )
    with door:
        yield door


def _post(door: Door, body, headers: dict | None = None, path: str = "/v2/models/m/infer"):
    connection = http.client.HTTPConnection("127.0.0.1", door.http_port, timeout=30)
    try:
        chunked = not isinstance(body, bytes)
        connection.request("POST", path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _unary(door: Door, request: bytes, metadata=()) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{door.grpc_port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        return ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request, metadata=metadata, timeout=30)


def test_requests_pass_through_unchanged(door, upstream):
    status, answer = _post(door, b"x" * 1000, {"Inference-Header-Content-Length": "10", "triton-access-token": "t"})
    assert status == 200 and answer["bytes"] == 1000 and answer["path"] == "/v2/models/m/infer"
    assert (
        answer["headers"]["Inference-Header-Content-Length"] == "10" and answer["headers"]["triton-access-token"] == "t"
    )
    # A body without a length, and a compressed one: forwarded as the bytes they stand for.
    assert _post(door, iter([b"a" * 300, b"b" * 700]))[1]["bytes"] == 1000
    status, answer = _post(door, gzip.compress(b"z" * 5000), {"Content-Encoding": "gzip"})
    assert status == 200 and answer["bytes"] == 5000 and "Content-Encoding" not in answer["headers"]
    # gRPC: the bytes, the metadata and the upstream's own status.
    assert _unary(door, b"y" * 1000, metadata=(("token", "t"),)) == b"1000 t"
    with pytest.raises(grpc.RpcError) as refused:
        _unary(door, b"fail")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details() == "upstream says no"
    with grpc.insecure_channel(f"127.0.0.1:{door.grpc_port}") as channel:
        stream = channel.stream_stream(GRPC_STREAM_METHOD)(iter([b"ab", b"abc"]), timeout=30)
        assert list(stream) == [b"2", b"3"]


def test_a_request_over_the_limit_is_refused_before_anything_is_forwarded(door, upstream):
    http_server, _, _, grpc_echo = upstream
    status, answer = _post(door, b"x" * (LIMIT + 1))  # declared: refused from the head
    assert status == 413 and http_server.requests == 0
    assert answer["error"].startswith(f"the request is {LIMIT + 1} bytes, over this server's limit of {LIMIT} bytes")
    assert "--max-request-bytes" in answer["error"]
    # Without a length, or compressed small (a "zip bomb"): counted as it arrives, cut at the limit.
    assert _post(door, iter([b"x" * (LIMIT // 2)] * 3))[0] == 413
    bomb = gzip.compress(bytes(64 * LIMIT))
    assert len(bomb) < LIMIT
    status, answer = _post(door, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and answer["error"].startswith("the request's body grew over this server's limit")
    with pytest.raises(grpc.RpcError) as refused:
        _unary(door, bytes(LIMIT + 1))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"vs. {LIMIT}" in refused.value.details()
    assert grpc_echo.requests == 0  # nothing over the limit reached the upstream whole
    # ... and the door keeps serving.
    assert _post(door, b"x" * (LIMIT // 2))[0] == 200 and _unary(door, b"y") == b"1 "


def test_stalled_clients_delay_no_one_and_are_cut(door):
    silent_http = socket.create_connection(("127.0.0.1", door.http_port))
    silent_grpc = socket.create_connection(("127.0.0.1", door.grpc_port))
    half_head = socket.create_connection(("127.0.0.1", door.http_port))
    half_head.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n")
    stalled_body = socket.create_connection(("127.0.0.1", door.http_port))
    stalled_body.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    for _ in range(5):  # everyone else is answered at once
        assert _post(door, b"x" * 100)[0] == 200 and _unary(door, b"y") == b"1 "
    assert time.monotonic() - started < TIMEOUT_S
    stalled_body.settimeout(10 * TIMEOUT_S)
    answer = stalled_body.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"the request body stopped arriving" in answer
    for connection in (silent_http, half_head):  # closed by the door
        connection.settimeout(10 * TIMEOUT_S)
        assert connection.recv(65536) == b""
    for connection in (silent_http, silent_grpc, half_head, stalled_body):
        connection.close()


def test_stop_finishes_the_requests_in_flight_and_refuses_new_ones(door, upstream):
    http_server, *_ = upstream
    idle = http.client.HTTPConnection("127.0.0.1", door.http_port, timeout=30)  # kept alive, between requests
    idle.request("GET", "/v2/health/ready")
    assert idle.getresponse().read()
    http_server.delay_s = 2.0
    answers = []
    requests = [threading.Thread(target=lambda: answers.append(_post(door, b"x" * 100))) for _ in range(3)]
    for request in requests:
        request.start()
    time.sleep(0.5)  # in flight: the upstream is working on them
    started = time.monotonic()
    stopped = threading.Thread(target=door.stop)
    stopped.start()
    time.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", door.http_port), timeout=5)
    stopped.join(timeout=60)
    for request in requests:
        request.join(timeout=30)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert time.monotonic() - started < 10  # as long as the requests in flight took: the idle connection is closed
    idle.close()


def test_an_unreachable_upstream_is_a_clear_answer(upstream):
    with Door(
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        upstream_http=f"127.0.0.1:{free_port()}",
        upstream_grpc=f"127.0.0.1:{free_port()}",
        max_request_bytes=LIMIT,
    ) as door:
        status, answer = _post(door, b"x")
        assert status == 503 and "not reachable" in answer["error"]
        with pytest.raises(grpc.RpcError) as refused:
            _unary(door, b"y")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_busy_port_is_an_os_error(upstream):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for ports in (
            {"http_port": busy.getsockname()[1], "grpc_port": free_port()},
            {"http_port": free_port(), "grpc_port": busy.getsockname()[1]},
        ):
            door = Door(
                host="127.0.0.1",
                upstream_http="127.0.0.1:1",
                upstream_grpc="127.0.0.1:1",
                max_request_bytes=LIMIT,
                **ports,
            )
            with pytest.raises(OSError):
                door.start()


def test_the_default_limit_is_a_full_batch_of_the_largest_samples(monkeypatch):
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert default_max_request_bytes(8, 224) == 8 * (MAX_BYTES + 4) + (1 << 20)
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")  # images capped lower: a preprocessed tensor is the larger sample
    assert default_max_request_bytes(4, 224) == 4 * (3 * 224 * 224 * 4 + 4) + (1 << 20)
    monkeypatch.setenv(MAX_BYTES_ENV, str(1 << 30))
    assert default_max_request_bytes(32, 224) == GRPC_MESSAGE_CAP  # gRPC's own cap bounds it


@pytest.mark.parametrize(
    ("text", "count"), [("4096", 4096), ("64M", 64 << 20), ("1g", 1 << 30), ("512 KiB", 512 << 10)]
)
def test_byte_counts_are_spelled_plainly(text, count):
    assert parse_byte_count(text) == count


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--max-request-bytes", "100"],
            "--max-request-bytes must be in 1024..2147483647 (gRPC's message cap), got 100",
        ),
        (["--max-request-bytes", "3G"], "--max-request-bytes must be in 1024..2147483647"),
        (["--max-request-bytes", "lots"], "expected a byte count such as 1048576, 64M or 1G, got 'lots'"),
    ],
)
def test_a_bad_limit_is_a_usage_error_before_anything_loads(options, message, capsys):
    try:
        status = cli.main(["serve", "--checkpoint", "/nonexistent.pth", *options])
    except SystemExit as exit:  # argparse's own errors (a value it cannot convert)
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and message in err.splitlines()[-1] and "Traceback" not in err and "nonexistent" not in err
