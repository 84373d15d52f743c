"""Measure the demo's click-to-top-5 latency in headless Chromium (a maintainer tool, not part of the Space).

    python space/measure_latency.py --model nvidia_se_resnext101_32x4d --mirror DIR [--precision auto]

Starts the demo (``python -m space.app``) on a free 127.0.0.1 port with weights from ``DIR`` (see
``RESNEXT_HUB_WEIGHTS_MIRROR``), uploads each sample photo ``--rounds`` times after one warm-up
request, and prints each latency (click to the five rows of the answer on the page) and the median.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGES = REPO / "assets" / "images"
FIVE_ROWS = "document.querySelectorAll('#top5 button.confidence-set').length === 5"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/config", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"the app did not answer within {timeout_s:g} s")


def measure(url: str, rounds: int, chromium: str) -> list[float]:
    from playwright.sync_api import sync_playwright

    photos = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    latencies = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        for i, photo in enumerate([photos[0]] + photos * rounds):
            page.goto(url)
            page.set_input_files("#photo-input input[type=file]", str(photo))
            page.wait_for_selector("#photo-input img")
            started = time.perf_counter()
            page.click("#classify-photo")
            page.wait_for_function(FIVE_ROWS, timeout=600_000)
            if i:  # the first request is the warm-up
                latencies.append(time.perf_counter() - started)
        browser.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nvidia_se_resnext101_32x4d")
    parser.add_argument("--mirror", help="folder or URL with the checkpoint (default: the manifest's URLs)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RESNEXT_HUB_SPACE_DEFAULT_MODEL": args.model, "RESNEXT_HUB_SPACE_PRECISION": args.precision}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # finds the space package
    if args.mirror:
        env["RESNEXT_HUB_WEIGHTS_MIRROR"] = args.mirror
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "space.app", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, 300)
            latencies = measure(url, args.rounds, args.chromium)
        finally:
            process.terminate()
            process.wait(timeout=30)
    shown = ", ".join(f"{s:.2f}" for s in latencies)
    median = statistics.median(latencies)
    sys.stdout.write(f"{args.model} ({args.precision}): click-to-top-5 {shown} s; median {median:.2f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
