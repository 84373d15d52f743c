"""resnext-hub web demo: classify a photo with any served model, in the browser.

Runs locally (``python -m space.app`` from the repo root, then open http://127.0.0.1:7860) and as
a Hugging Face Space unchanged (``python space/bundle.py DIR`` lays out the Space, whose root
``app.py`` runs this module). Built for the public internet: uploads are size-capped, the queue is
bounded, one inference runs at a time per model pool, each request has a time limit, URLs are
fetched only from public addresses (``processing.fetch``), and visitors see a short message for every
failure, never a traceback.

Settings (environment): ``RESNEXT_HUB_SPACE_DEFAULT_MODEL`` (hub entry shown first),
``RESNEXT_HUB_SPACE_PRECISION`` (``auto``/``fp32``/``bf16``, for ``optimize_for_inference``),
``RESNEXT_HUB_WEIGHTS_MIRROR`` (offline weights), ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo server

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from resnext_hub import processing  # noqa: E402
from resnext_hub.models import list_models  # noqa: E402
from resnext_hub.models.optimize import PRECISIONS  # noqa: E402
from resnext_hub.processing.fetch import FetchError, URLRefusedError, is_public_address  # noqa: E402
from resnext_hub.results import failure_reason  # noqa: E402

from .serving import PRECISION_ENV, ModelCache, ModelLoadError, ModelNotReadyError, Served  # noqa: E402

# The repository (or the bundled Space's root): hubconf.py and the sample photos are there.
REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger("resnext_hub.space")

DEFAULT_MODEL_ENV = "RESNEXT_HUB_SPACE_DEFAULT_MODEL"
DEFAULT_MODEL = "nvidia_se_resnext101_32x4d"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 40_000_000
REQUEST_TIME_LIMIT_S = 20.0
URL_DEADLINE_S = 15.0
MODEL_WAIT_S = 90.0
QUEUE_SIZE = 16
CONCURRENCY = 2
SAMPLES = REPO / "assets" / "images"
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _Refused(Exception):
    """A request refused with a message for the visitor (raised inside the worker thread)."""


def _error(message: str, title: str) -> gr.Error:
    """A message for the visitor; expected failures need no traceback in the server log."""
    return gr.Error(message, title=title, print_exception=False)


def _short(text: str, limit: int = 160) -> str:
    # Messages echo bits of visitor input: keep them short and free of markup.
    text = text.replace("<", "‹").replace(">", "›")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Demo:
    """The app's state (model cache, worker pool) and its request handlers."""

    def __init__(self, default_model: str | None = None, precision: str | None = None) -> None:
        self.entries = list_models()
        wanted = default_model or os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL
        if wanted not in self.entries:
            raise SystemExit(f"{DEFAULT_MODEL_ENV}={wanted!r} is not a served model; expected one of {self.entries}")
        precision = precision or os.environ.get(PRECISION_ENV) or "auto"
        if precision not in PRECISIONS:
            raise SystemExit(f"{PRECISION_ENV}={precision!r} is not a precision; expected one of {PRECISIONS}")
        self.default_model = wanted
        self.models = ModelCache(REPO, self.entries, precision)
        # At most CONCURRENCY requests decode and infer at once; Gradio's bounded queue holds the rest.
        self.workers = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="classify")
        # Which resolved addresses a visitor's URL may reach: public ones only (tests swap in loopback).
        self.url_policy = is_public_address

    # -- request handlers (called by Gradio with raw, unpreprocessed values) --

    def classify_upload(self, entry: str, upload: dict | None) -> tuple[Any, dict, str]:
        """Top-5 of an uploaded, pasted or example photo."""
        path = upload.get("path") if isinstance(upload, dict) else None
        if not path:
            raise _error("Upload or paste a photo first (or pick one of the sample photos).", "No photo")
        return self._classify(
            entry,
            lambda min_size: processing.load_image(
                path, min_size=min_size, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS
            ),
        )

    def classify_url(self, entry: str, url: str | None) -> tuple[Any, dict, str]:
        """Top-5 of the image at a public http(s) URL."""
        url = (url or "").strip()
        if not url:
            raise _error("Paste the address of an image (http:// or https://) first.", "No URL")

        def load(min_size: int | None) -> Image.Image:
            limits = {"max_bytes": MAX_UPLOAD_BYTES, "max_pixels": MAX_PIXELS, "deadline_s": URL_DEADLINE_S}
            return processing.load_image(url, min_size=min_size, allow=self.url_policy, **limits)

        return self._classify(entry, load)

    def describe(self, entry: str) -> str:
        """The model card of ``entry`` (loads the model if needed)."""
        return self._served(entry).card

    # -- internals --

    def _served(self, entry: str) -> Served:
        if entry not in self.entries:
            raise _error(f"Pick one of the listed models ({', '.join(self.entries)}).", "Unknown model")
        try:
            return self.models.get(entry, MODEL_WAIT_S)
        except ModelNotReadyError:
            raise _error(
                f"{entry} is still loading its weights; try again in a minute.", title="Model loading"
            ) from None
        except ModelLoadError:
            raise _error(
                f"{entry} could not be loaded on this server; pick another model.", title="Model unavailable"
            ) from None

    def _classify(self, entry: str, load: Callable[[int | None], Image.Image]) -> tuple[Any, dict, str]:
        """Run ``load(min_size)`` (decoding at the served engine's ``decode_size``) and the model, with time limits."""
        served = self._served(entry)
        started = time.perf_counter()
        future = self.workers.submit(self._run, served, load)
        try:
            photo, ranked = future.result(timeout=REQUEST_TIME_LIMIT_S)
        except FutureTimeout:
            raise _error(
                f"This took over {REQUEST_TIME_LIMIT_S:g} s and was stopped; try a smaller image.", title="Too slow"
            ) from None
        except _Refused as refused:
            title, message = refused.args
            raise _error(message, title) from None
        except Exception:
            log.exception("request failed")
            raise _error("Something went wrong on the server; please try again.", "Error") from None
        log.info("%s: %.0f ms", entry, 1000 * (time.perf_counter() - started))
        return photo, top5_dict(ranked), served.card

    def _run(self, served: Served, load: Callable[[int | None], Image.Image]) -> tuple[Image.Image, list]:
        try:
            image = load(served.engine.decode_size)
        except processing.InvalidImageError as error:
            cause = error.__cause__  # the FetchError, for a URL that gave no body
            if isinstance(cause, URLRefusedError):
                raise _Refused("Address not allowed", _short(f"That URL is not allowed: {cause.reason}.")) from None
            if isinstance(cause, FetchError):
                message = f"Could not fetch that URL: {cause.reason}."
                raise _Refused("Could not fetch the image", _short(message)) from None
            reason = re.sub(r" \(first bytes .*\)$", "", error.reason)
            raise _Refused("Not a usable image", _short(f"That file is not a usable image: {reason}.")) from None
        except Exception as error:  # anything else reading or decoding raised: this photo only
            raise _unprocessable(error) from None
        try:
            prepared = served.prepare(image)
        except Exception as error:  # the preprocessing of this photo
            raise _unprocessable(error) from None
        ranked = served.top5_of(prepared)
        shown = image.copy()
        shown.thumbnail((512, 512))
        return shown, ranked


def _unprocessable(error: Exception) -> _Refused:
    """The visitor's message for a photo that failed in an unexpected way: its type and message, short."""
    log.warning("a photo could not be processed: %s", failure_reason(error))
    message = f"That image could not be processed ({failure_reason(error)})."
    return _Refused("Could not process the image", _short(message))


def top5_dict(ranked: list) -> dict[str, float]:
    """``{label: probability}`` for gr.Label; a label seen twice (ImageNet has two "crane"s) gets its index."""
    shown: dict[str, float] = {}
    for prediction in ranked:
        name = prediction.label if prediction.label not in shown else f"{prediction.label} (#{prediction.index})"
        shown[name] = prediction.probability
    return shown


def sample_photos() -> list[str]:
    return [str(p) for p in sorted(SAMPLES.iterdir()) if p.suffix.lower() in SAMPLE_SUFFIXES]


def build(demo_state: Demo) -> gr.Blocks:
    """The page: model picker, photo/URL input, photo + top-5 + model card."""
    inference = {"concurrency_id": "inference", "concurrency_limit": CONCURRENCY, "preprocess": False}
    with gr.Blocks(title="resnext-hub demo", analytics_enabled=False) as blocks:
        gr.Markdown(
            "# ResNeXt / SE-ResNeXt image classification\n"
            "NVIDIA's ResNeXt101-32x4d and SE-ResNeXt101-32x4d and timm's SE-ResNeXt family, loaded through "
            "`torch.hub` from this repository. Upload or paste a photo, or give an image URL."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(
                    demo_state.entries, value=demo_state.default_model, label="Model", elem_id="model-picker"
                )
                with gr.Tab("Photo"):
                    photo_in = gr.Image(
                        type="filepath", sources=["upload", "clipboard"], label="Upload or paste a photo",
                        elem_id="photo-input",
                    )  # fmt: skip
                    classify_photo = gr.Button("Classify photo", variant="primary", elem_id="classify-photo")
                    examples = gr.Examples(sample_photos(), inputs=[photo_in], label="Sample photos (one click)")
                with gr.Tab("URL"):
                    url_in = gr.Textbox(
                        label="Image URL", placeholder="https://…/photo.jpg", max_lines=1, elem_id="url-input"
                    )
                    classify_url = gr.Button("Fetch and classify", variant="primary", elem_id="classify-url")
            with gr.Column():
                photo_out = gr.Image(label="Photo", interactive=False, elem_id="photo-output")
                top5 = gr.Label(num_top_classes=5, label="Top-5", elem_id="top5")
                card = gr.Markdown(elem_id="model-card")
        outputs = [photo_out, top5, card]
        classify_photo.click(demo_state.classify_upload, [model, photo_in], outputs, api_name="classify", **inference)
        examples.load_input_event.then(demo_state.classify_upload, [model, photo_in], outputs, **inference)
        classify_url.click(demo_state.classify_url, [model, url_in], outputs, api_name="classify_url", **inference)
        url_in.submit(demo_state.classify_url, [model, url_in], outputs, **inference)
        model.change(demo_state.describe, [model], [card], preprocess=False, concurrency_id="load")
        blocks.load(demo_state.describe, [model], [card], preprocess=False, concurrency_id="load")
    return blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--model", default=None, help=f"default model (or set {DEFAULT_MODEL_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    state = Demo(default_model=args.model)
    state.models.start(state.default_model)  # load while the server starts
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    build(state).queue(max_size=QUEUE_SIZE, default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=False,
        allowed_paths=[str(SAMPLES)],
        ssr_mode=False,
        theme=theme,
        footer_links=[],
    )


if __name__ == "__main__":
    main()
