"""The web demo in a real browser: Debian's Chromium, headless, driven by Playwright.

The app runs as users run it (``python -m space.app``) on 127.0.0.1, loading a small model
(seresnext26d_32x4d, random weights in timm's layout) from a mirror folder through torch.hub.
The page's top-5 must equal the library's own answer for the same photo and weights.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from resnext_hub.processing import prepare_input_from_uri, top_k

pytestmark = pytest.mark.slow  # a browser and the app's server

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "assets" / "images"
CHROMIUM = "/usr/bin/chromium"
# Chromium flags for a closed network: no background fetches, no sandbox as root, fresh profile.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
MODEL = "seresnext26d_32x4d"
# The mirror holds the manifest's alternative source: its name carries no hash prefix to match.
MIRROR_FILE = "seresnext26d_32x4d.bt_in1k.safetensors"
SCREENSHOT_ENV = "RESNEXT_HUB_SPACE_SCREENSHOT"
STARTUP_S = 120


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Random weights with a sharpened head, so the top-5 probabilities are far apart and readable."""
    from safetensors.torch import save_file

    from tools.fake_checkpoints import random_state_dict

    state = random_state_dict(MODEL, seed=3)
    state["fc.weight"] *= 60  # random heads give near-uniform softmax; this spreads the logits
    path = tmp_path_factory.mktemp("mirror") / MIRROR_FILE
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def library_model(weights_file: Path) -> torch.nn.Module:
    return torch.hub.load(str(ROOT), MODEL, source="local", trust_repo=True, pretrained_from_file=str(weights_file))


def library_top5(model: torch.nn.Module, photo: Path) -> list[tuple[str, float]]:
    """The library's answer: the model's own preprocessing, the plain eager model, top-5 softmax."""
    with torch.no_grad():
        logits = model(prepare_input_from_uri(photo, preprocessing=model))
    return [(p.label, p.probability) for p in top_k(logits, 5, logits=True)[0]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, weights_file: Path):
    """``python -m space.app`` on a free 127.0.0.1 port, offline, with the mirror's weights."""
    work = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = {
        **os.environ,
        "TORCH_HOME": str(work / "torch_home"),
        "RESNEXT_HUB_WEIGHTS_MIRROR": str(weights_file.parent),
        "RESNEXT_HUB_SPACE_DEFAULT_MODEL": MODEL,
        "RESNEXT_HUB_SPACE_PRECISION": "fp32",
        "GRADIO_TEMP_DIR": str(work / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),  # the space package, run from another folder
    }
    log_path = work / "app.log"
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "space.app", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/config", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    app_log = log_path.read_text()
    assert "Traceback" not in app_log, f"the app logged a traceback:\n{app_log[-3000:]}"


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (or: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url: str):
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    page = context.new_page()
    outside = []
    page.on("request", lambda request: None if request.url.startswith(app_url) else outside.append(request.url))
    page.goto(app_url)
    page.wait_for_selector("#photo-input input[type=file]", state="attached")
    yield page
    context.close()
    assert not outside, f"the page requested addresses other than the app: {outside}"


def classify_upload(page, photo: Path) -> float:
    """Upload ``photo``, click Classify, wait for the top-5; returns click-to-answer seconds."""
    page.set_input_files("#photo-input input[type=file]", str(photo))
    page.wait_for_selector("#photo-input img")
    started = time.perf_counter()
    page.click("#classify-photo")
    page.wait_for_function("document.querySelectorAll('#top5 button.confidence-set').length === 5", timeout=60_000)
    return time.perf_counter() - started


def page_top5(page) -> list[tuple[str, float]]:
    """Label and probability of each row of the page's top-5 (the meter holds the exact value)."""
    rows = page.locator("#top5 button.confidence-set")
    return [
        (row.locator("dt").inner_text().strip(), float(row.locator("meter").get_attribute("value")))
        for row in rows.all()
    ]


def assert_same_top5(shown: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [label for label, _ in shown] == [label for label, _ in expected]
    for (label, got), (_, want) in zip(shown, expected):
        assert got == pytest.approx(want, abs=2e-3), label


def toast_text(page) -> str:
    page.wait_for_selector("[data-testid=toast-body]", timeout=30_000)
    return page.locator("[data-testid=toast-body]").first.inner_text()


def test_page_shows_the_model_card(page) -> None:
    card = page.locator("#model-card")
    card.get_by_text("16,809,512 parameters").wait_for(timeout=60_000)
    text = card.inner_text()
    assert "top-1 77.592%, top-5 93.614%" in text
    assert "Apache-2.0" in text
    assert "seresnext26d_32x4d-80fa48a3.pth" in text
    assert "resize the shorter side to 256 (bicubic, antialiased), center-crop 224x224" in text  # the preset's own


def test_uploaded_photo_gives_the_library_top5(page, library_model, tmp_path, capsys) -> None:
    photo = IMAGES / "chelsea.jpg"
    classify_upload(page, photo)  # the first request also warms up the page
    assert_same_top5(page_top5(page), library_top5(library_model, photo))
    page.wait_for_selector("#photo-output img")
    page.wait_for_selector("#explanation-output img")  # the overlay beside the top-5

    screenshot = tmp_path / "screenshot.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(screenshot, os.environ[SCREENSHOT_ENV])

    latencies = []
    for name in ("coffee.jpg", "rocket.jpg", "astronaut.jpg", "camera.png"):
        page.reload()
        page.wait_for_selector("#photo-input input[type=file]", state="attached")
        latencies.append(classify_upload(page, IMAGES / name))
        assert_same_top5(page_top5(page), library_top5(library_model, IMAGES / name))
    with capsys.disabled():
        shown = ", ".join(f"{s:.2f}" for s in latencies)
        sys.stdout.write(f"\n[space] click-to-top-5 latency after warm-up: {shown} s\n")
    assert statistics.median(latencies) < 5.0


def test_a_sample_photo_is_one_click(page, library_model) -> None:
    page.locator("button.gallery-item").nth(3).click()  # coffee.jpg (samples are sorted by name)
    page.wait_for_function("document.querySelectorAll('#top5 button.confidence-set').length === 5", timeout=60_000)
    assert_same_top5(page_top5(page), library_top5(library_model, IMAGES / "coffee.jpg"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"<html><body>404 Not Found</body></html>", "not a usable image"),
        ((IMAGES / "chelsea.jpg").read_bytes()[:5000], "not a usable image"),
    ],
)
def test_a_bad_file_gives_a_friendly_message(page, tmp_path, content: bytes, message: str) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(content)
    page.set_input_files("#photo-input input[type=file]", str(bad))
    page.click("#classify-photo")
    text = toast_text(page)
    assert message in text
    assert "Traceback" not in text and 'File "' not in text
    assert page.locator("#top5 button.confidence-set").count() == 0


def test_private_urls_are_refused_before_connecting(page) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        page.get_by_role("tab", name="URL").click()
        refused = ((f"http://127.0.0.1:{port}/x.jpg", "127.0.0.1 is"), ("http://10.0.0.1/x.jpg", "10.0.0.1 is"))
        for url, shown in refused:
            page.fill("#url-input textarea, #url-input input", url)
            page.click("#classify-url")
            text = toast_text(page)
            assert "That URL is not allowed" in text and shown in text and "only public internet addresses" in text
            page.locator("[data-testid=toast-close]").first.click()
            page.wait_for_selector("[data-testid=toast-body]", state="detached")
        with pytest.raises(TimeoutError):
            listener.accept()  # the app never connected to the loopback URL


def test_an_oversized_upload_is_refused(page, tmp_path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"\0" * (9 * 1024 * 1024))
    page.set_input_files("#photo-input input[type=file]", str(big))
    assert "exceed the maximum allowed size of 8.0 Mb" in toast_text(page)
