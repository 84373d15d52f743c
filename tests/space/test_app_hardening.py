"""The web demo's HTTP API as a hostile client, a slow image server or a stopping host meets it (issue 20).

The rule: every failure is a short message, never a traceback; a request costs bounded time and
memory (a body over the limit is refused before it is read); class names that are not valid text
cannot break an answer; stalled or many clients do not starve the others; a graceful stop (SIGTERM)
finishes the requests in flight and ends every process the app started.

The app runs as users run it (``space.server``'s ``main``) in a child process, serving a fine-tuned
checkpoint of the small model whose five class names are not valid text or are markup. Its address
policy lets it fetch from this test's loopback image server only (the one patch; a public server
cannot be had offline). Requests go through Gradio's HTTP API (``/gradio_api/upload``,
``/gradio_api/call/<api>``), as any client's do.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from rawserver import RawServer, drip, reply

from resnext_hub.console import printable

pytestmark = pytest.mark.slow  # each test talks to a real app in a child process

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "assets" / "images"
ARCH = "seresnext26d_32x4d"
# Accents, HTML, Markdown, a backslash (names that are not valid text, such as a line break or a byte that is not
# UTF-8, are refused when the class list is made: processing.labels).
NAMES = ["café", "line one", "<img src=x onerror=alert(1)>", "**bold** [x](javascript:alert(1))", "back\\slash"]
FILE_META = {"_type": "gradio.FileData"}  # what marks a value as a file for Gradio
STARTUP_S = 180
URL_DEADLINE_S = 10.0  # the app's whole-fetch deadline for a URL, shortened so a stalled fetch ends within the test
# The app's own launcher, with one change: URLs may reach this test's image server on 127.0.0.1, and nothing else.
LAUNCHER = f"""
import ipaddress, sys
from space import app, server
app.is_public_address = lambda ip: ip == ipaddress.ip_address("127.0.0.1")
app.URL_DEADLINE_S = {URL_DEADLINE_S}
server.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory) -> Path:
    """A fine-tuned checkpoint (finetune's format) with :data:`NAMES` as its classes and a sharp head."""
    from resnext_hub.models import build_model
    from resnext_hub.models.finetuned import finetuned_checkpoint
    from resnext_hub.processing import ClassList
    from tools.fake_checkpoints import random_state_dict

    state = random_state_dict(ARCH, seed=4)
    features = state["fc.weight"].shape[1]
    state["fc.weight"] = torch.randn(len(NAMES), features, generator=torch.Generator().manual_seed(4)) * 10
    state["fc.bias"] = torch.zeros(len(NAMES))
    preset = build_model(ARCH, pretrained=False).preprocessing
    path = tmp_path_factory.mktemp("odd") / "odd.pth"
    torch.save(finetuned_checkpoint(state, architecture=ARCH, classes=ClassList.of(NAMES), preprocessing=preset), path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class App:
    """``space.server`` in a child process on a free 127.0.0.1 port, serving ``checkpoint``; its output in ``log``."""

    def __init__(self, checkpoint: Path, work: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "app.log"
        env = {
            **os.environ,
            "TORCH_HOME": str(work / "torch_home"),
            "GRADIO_TEMP_DIR": str(work / "gradio"),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_NUM_WORKERS": "1",  # Gradio's static file worker: one more process the app must end
            "RESNEXT_HUB_SPACE_PRECISION": "fp32",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-c", LAUNCHER, "--checkpoint", str(checkpoint), "--port", str(self.port)]
        with open(self.log, "wb") as log:
            # A session of its own: close() ends the app's process group, Gradio's forked worker included (a
            # SIGKILL to the app alone would leave that worker running, orphaned).
            self.process = subprocess.Popen(
                command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the app exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/config", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"the app did not answer within {STARTUP_S} s:\n{self.text()[-3000:]}")
            time.sleep(0.25)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the app and any process it started
        except ProcessLookupError:
            pass  # all gone already
        self.process.wait()


@pytest.fixture(scope="module")
def app(odd_checkpoint, tmp_path_factory):
    served = App(odd_checkpoint, tmp_path_factory.mktemp("app"))
    try:
        classify(served, upload(served, IMAGES / "chelsea.jpg"))  # the model is loaded, the page warm
        yield served
    finally:
        served.close()


# -- a client of Gradio's HTTP API ----------------------------------------------------------------------------------


def _post(app: App, path: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(app.url + path, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def upload(app: App, photo: Path) -> dict:
    """Upload ``photo`` as the page does; the file value the API's image input takes."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{photo.name}"\r\n\r\n'
    body = head.encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, answer = _post(app, "/gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    return {"path": json.loads(answer)[0], "meta": FILE_META}


def call(app: App, api: str, *data: object, timeout: float = 120) -> tuple[str, object]:
    """One API call: ``("complete", outputs)``, ``("error", {"error": message, "title": ...})``, or
    ``("refused", (status, body))`` when the queue would not take it."""
    status, answer = _post(
        app, f"/gradio_api/call/{api}", json.dumps({"data": list(data)}).encode(), "application/json"
    )
    if status != 200:
        return "refused", (status, answer)
    event_id = json.loads(answer)["event_id"]
    with urllib.request.urlopen(f"{app.url}/gradio_api/call/{api}/{event_id}", timeout=timeout) as response:
        stream = response.read().decode()
    events = [block.split("\n", 1) for block in stream.strip().split("\n\n")]
    final = [
        (name.removeprefix("event: "), rest) for name, rest in events if name in ("event: complete", "event: error")
    ]
    assert len(final) == 1, stream
    name, data_line = final[0]
    return name, json.loads(data_line.removeprefix("data: "))


def classify(app: App, photo: dict, entry: str = ARCH) -> list[str]:
    """The top-5 labels of an uploaded photo (the call must succeed)."""
    outcome, outputs = call(app, "classify", entry, photo)
    assert outcome == "complete", outputs
    return [row["label"] for row in outputs[1]["confidences"]]


# -- the tests --------------------------------------------------------------------------------------------------------


def test_every_failure_is_a_short_message_never_a_traceback(app, tmp_path):
    photo = upload(app, IMAGES / "chelsea.jpg")
    # A real photo the server can read, but not one a visitor uploaded: the API must not open server paths.
    elsewhere = tmp_path / "not-uploaded.jpg"
    elsewhere.write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    with RawServer(reply(b"<html>Not Found</html>", status="404 Not Found", content_type="text/html")) as server:
        wrong = {
            "a model that is not served": ("classify", "nvidia_se_resnext101_32x4d", photo),
            "a model that is not a name": ("classify", ["x"], photo),
            "no photo": ("classify", ARCH, None),
            "a photo that is not a file value": ("classify", ARCH, str(IMAGES / "chelsea.jpg")),
            "a path that is not text": ("classify", ARCH, {"path": 7}),
            "a file value whose path is not text": (
                "classify",
                ARCH,
                {"path": 7, "meta": {"_type": "gradio.FileData"}},
            ),
            "one value too few": ("classify", ARCH),
            "a file that is not an image": ("classify", ARCH, {"path": str(ROOT / "README.md")}),
            "a photo that was not uploaded": ("classify", ARCH, {"path": str(elsewhere)}),
            "a server file by its path": ("classify", ARCH, {"path": "/etc/hostname"}),
            "a URL that is not text": ("classify_url", ARCH, 7),
            "a URL that is a list": ("classify_url", ARCH, ["http://example.com/a.jpg"]),
            "a URL that is a local file": ("classify_url", ARCH, "file:///etc/passwd"),
            "a URL of a private address": ("classify_url", ARCH, "http://10.0.0.1/a.jpg"),
            "a URL that gives no image": ("classify_url", ARCH, f"{server.url}/photo.jpg"),
        }
        problems = []
        for case, (api, *data) in wrong.items():
            outcome, answer = call(app, api, *data)
            try:
                assert outcome == "error", (outcome, answer)
                message = answer.get("error")
                assert isinstance(message, str) and 0 < len(message) <= 200, answer
                assert "Traceback" not in message and 'File "' not in message, message
            except AssertionError as failure:
                problems.append(f"{case}: {failure}")
    assert classify(app, photo)  # still serving
    assert "Traceback" not in app.text(), app.text()[-3000:]
    assert not problems, "\n".join(problems)


def test_class_names_with_markup_are_escaped_in_every_answer(app):
    outcome, outputs = call(app, "classify", ARCH, upload(app, IMAGES / "coffee.jpg"))
    assert outcome == "complete", outputs
    _, top5, card, explained = outputs
    assert isinstance(explained, dict) and explained.get("url"), explained  # the overlay came back as an image
    # Every name, escaped to one line of valid text, each still its own class.
    assert sorted(row["label"] for row in top5["confidences"]) == sorted(printable(name) for name in NAMES)
    assert top5["label"] == top5["confidences"][0]["label"]
    # The card lists them as literal text in its Markdown: every character Markdown or HTML acts on is escaped.
    listed = r"5 classes: café, line one, \<img src=x onerror=alert(1)\>, \*\*bold\*\* \[x\](javascript:alert(1))"
    assert listed + r", back\\\\slash" + "\n" in card, card
    assert "Traceback" not in app.text()


def _raw_request(app: App, path: str, headers: dict[str, str], body: bytes = b"", chunked: bool = False) -> int | str:
    """The status of a POST whose head (and ``body``, in 64 KiB chunks if ``chunked``) is sent, its body never
    finished: an answer can only come from a server that judged the request without reading all of it."""
    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=20)
    try:
        connection.putrequest("POST", path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        for start in range(0, len(body), 65536):
            piece = body[start : start + 65536]
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        return connection.getresponse().status
    except (TimeoutError, ConnectionError) as error:
        return f"no answer ({type(error).__name__})"
    finally:
        connection.close()


def test_a_request_body_over_the_limit_is_refused_before_it_is_read(app):
    limit = 8 * 1024 * 1024 + 64 * 1024  # the server's MAX_REQUEST_BYTES (space.server)
    # Well-formed beginnings, so that only their size is wrong: two files, each under the upload cap, and JSON.
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n' + b"x" * (limit // 2)
    files = (part + b"\r\n" + part)[: limit + 1024]
    data = (b'{"data": ["' + b"x" * limit)[: limit + 1024]
    pid = psutil.Process(app.process.pid)
    before = pid.memory_info().rss
    kinds = {
        "upload": ("/gradio_api/upload", "multipart/form-data; boundary=b", files),
        "API call": ("/gradio_api/call/classify", "application/json", data),
        "queue join": ("/gradio_api/queue/join", "application/json", data),
    }
    problems = []
    for kind, (path, content_type, over) in kinds.items():
        declared = {"Content-Type": content_type, "Content-Length": str(1 << 30)}
        streamed = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        for how, status in (
            ("a declared 1 GiB body", _raw_request(app, path, declared)),
            ("a chunked body over the limit", _raw_request(app, path, streamed, over, chunked=True)),
        ):
            if status != 413:
                problems.append(f"{kind}, {how}: {status}, not 413")
    assert not problems, "\n".join(problems)
    assert pid.memory_info().rss - before < 64 * 1024 * 1024  # no body was kept
    # A photo just under the upload cap still goes through.
    assert classify(app, upload(app, IMAGES / "chelsea.jpg"))
    assert "Traceback" not in app.text(), app.text()[-3000:]


def test_stalled_and_many_clients_do_not_starve_the_others(app):
    photo = upload(app, IMAGES / "camera.png")
    # Clients that stall: half a request head, half a body, and URLs of an image server that drips its bytes.
    stalled = []
    for head in (b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\n", b"GET /config HTTP/1.1\r\nHo"):
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", app.port))
            sock.sendall(head)
            stalled.append(sock)
    body_head = "POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", app.port))
        sock.sendall(f"{body_head}Content-Length: 100000\r\n\r\n--b\r\n".encode())
        stalled.append(sock)
    pool = ThreadPoolExecutor(max_workers=40)
    try:
        with RawServer(drip(interval_s=0.2)) as slow_server:
            slow = [pool.submit(call, app, "classify_url", ARCH, f"{slow_server.url}/{i}.jpg") for i in range(6)]
            time.sleep(1.0)  # the slow fetches have begun
            started = time.monotonic()
            assert classify(app, photo)
            waited = time.monotonic() - started
            assert waited < URL_DEADLINE_S / 2, f"an upload waited {waited:.1f} s behind the stalled URL fetches"
            for future in slow:  # each stalled fetch ends at its deadline with a message
                outcome, answer = future.result(timeout=3 * URL_DEADLINE_S + 60)
                assert outcome in ("error", "refused"), (outcome, answer)
        # Many clients at once: the queue takes what it holds, refuses the rest at once, and serves what it took.
        flood = [pool.submit(call, app, "classify", ARCH, photo) for _ in range(40)]
        outcomes = [future.result(timeout=600) for future in flood]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for sock in stalled:
            sock.close()
    kinds = [outcome for outcome, _ in outcomes]
    assert set(kinds) <= {"complete", "refused"} and "complete" in kinds, outcomes
    assert "refused" in kinds, "40 requests at once were all queued: the queue is not bounded"
    assert all(answer[0] == 503 for outcome, answer in outcomes if outcome == "refused"), outcomes
    assert "Traceback" not in app.text(), app.text()[-3000:]


def test_a_graceful_stop_finishes_the_requests_in_flight_and_ends_every_process(odd_checkpoint, tmp_path):
    served = App(odd_checkpoint, tmp_path)
    try:
        big = tmp_path / "big.jpg"  # ~0.3 s to decode and resize here: requests are in flight when the stop comes
        noise = torch.randint(0, 256, (2400, 2400, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        Image.fromarray(noise.numpy()).save(big, quality=70)
        photo = upload(served, big)
        classify(served, photo)  # loaded and warm
        children = psutil.Process(served.process.pid).children(recursive=True)
        assert children, "no helper process to check: Gradio started no static file worker"
        pool = ThreadPoolExecutor(max_workers=6)
        requests = [pool.submit(call, served, "classify", ARCH, photo) for _ in range(6)]
        time.sleep(1.0)
        served.process.send_signal(signal.SIGTERM)
        outcomes = []
        for future in requests:
            try:
                outcomes.append(future.result(timeout=120))
            except Exception as error:  # a request cut off: what the stop must not do
                outcomes.append(("cut off", repr(error)))
        pool.shutdown()
        status = served.process.wait(timeout=120)
        # Before close(), which ends whatever is left of the app's process group: the stop itself must end them.
        left = [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    finally:
        served.close()
    for outcome, answer in outcomes:
        assert outcome == "complete" or (outcome == "error" and "restarting" in answer.get("error", "")), outcomes
    assert [outcome for outcome, _ in outcomes].count("complete") >= 1, outcomes  # those in flight were finished
    assert status == 0, served.text()[-3000:]
    assert not left, children
    assert "Traceback" not in served.text(), served.text()[-3000:]
