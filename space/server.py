"""The web demo's server: :func:`main` (its command line, ``python -m space.app``) runs :mod:`space.app`'s page.

Every request body is size-capped before it is read (:mod:`space.limits`), and the queue is bounded (more requests are
refused with HTTP 503 at once). SIGTERM or Ctrl-C stops it gracefully: new requests get a short message, those in
flight finish, then the server and every process it started end.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import threading
import time

from . import app  # first: it sets Gradio's environment before Gradio is imported

# isort: split
import gradio as gr
from starlette.middleware import Middleware

from .app import DEFAULT_MODEL_ENV, MAX_UPLOAD_BYTES, REQUEST_TIME_LIMIT_S, SAMPLES, Demo, build
from .limits import RequestSizeLimit

log = logging.getLogger("resnext_hub.space")

# Any request's body: an upload's multipart wrapping fits in the margin, the JSON API's bodies are small.
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
QUEUE_SIZE = 16  # requests waiting, all handlers together; more are refused at once (HTTP 503)
STOP_GRACE_S = REQUEST_TIME_LIMIT_S + 10.0  # how long a graceful stop waits for the requests in flight


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=app.__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--model",
        default=None,
        help=f"default model (or set {DEFAULT_MODEL_ENV}); with --checkpoint, its architecture (default: the file's)",
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", help="serve this local checkpoint (e.g. finetune's best.pth) with its labels"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    state = Demo(default_model=args.model, checkpoint=args.checkpoint)
    serve(state, build(state), args.host, args.port)


def serve(state: Demo, blocks: gr.Blocks, host: str, port: int) -> None:
    """Run the app until SIGTERM or SIGINT, then stop gracefully (see the module docstring) within about
    2 x :data:`STOP_GRACE_S`."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT explicitly: a background job inherits it ignored
        signal.signal(signum, lambda signum, frame: stop.set())
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    blocks.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_UPLOAD_BYTES,
        app_kwargs={"middleware": [Middleware(RequestSizeLimit, max_bytes=MAX_REQUEST_BYTES)]},
        show_error=False,
        allowed_paths=[str(SAMPLES)],
        ssr_mode=False,
        theme=theme,
        footer_links=[],
        prevent_thread_lock=True,
    )
    # Loaded once the server is up: Gradio's launch probes its own URL with a 3 s timeout and gives up when a
    # checkpoint being unpickled holds the interpreter that long on a busy machine.
    state.models.start(state.default_model)
    stop.wait()
    log.info("stopping: new requests are refused, those in flight finish (at most %g s)", STOP_GRACE_S)
    finished = state.stop(STOP_GRACE_S) and _queue_idle(blocks, STOP_GRACE_S)
    time.sleep(0.5)  # the last answers are on their way to the clients
    blocks.close(verbose=False)  # the server, its queue and its helper processes (Gradio's static file workers)
    state.close()
    for child in multiprocessing.active_children():  # any other process this one started
        child.terminate()
        child.join(5)
    log.info("stopped%s", "" if finished else " (requests still in flight were cut off)")


def _queue_idle(blocks: gr.Blocks, timeout_s: float) -> bool:
    """Wait until Gradio's queue holds no request, waiting or running (those admitted before the stop get their
    answer, or the restarting message); True if it emptied in time."""
    deadline = time.monotonic() + timeout_s
    queue = blocks._queue  # Gradio has no public way to ask (gradio is pinned in requirements.txt)
    while len(queue) or any(job is not None for job in queue.active_jobs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
