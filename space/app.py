"""resnext-hub web demo: classify a photo with any served model, in the browser.

The page and its request handlers (:class:`Demo`, :func:`build`); :mod:`space.server` runs them. Runs locally
(``python -m space.app`` from the repo root, then open http://127.0.0.1:7860) and as a Hugging Face Space unchanged
(``python space/bundle.py DIR`` lays out the Space, whose root ``app.py`` runs :mod:`space.server`). Built for the
public internet: uploads are size-capped before they are decoded, at most :data:`CONCURRENCY` inferences run at once,
each request has a time limit, URLs are fetched only from public addresses (``processing.fetch``) and outside the
inference slots (a slow image server cannot hold them), class names reach the page escaped, and visitors see a short
message for every failure, never a traceback. The server caps every request body and bounds the queue, and stops
gracefully (:mod:`space.server`).

``--checkpoint FILE`` serves one model with a local checkpoint instead (``finetune``'s ``best.pth``: its
architecture and class names come from the file; ``--model`` names the architecture of other files)::

    python -m space.app --checkpoint runs/mine/best.pth

Settings (environment): ``RESNEXT_HUB_SPACE_DEFAULT_MODEL`` (hub entry shown first),
``RESNEXT_HUB_SPACE_PRECISION`` (``auto``/``fp32``/``bf16``, for ``optimize_for_inference``),
``RESNEXT_HUB_WEIGHTS_MIRROR`` (offline weights), ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo server

import gradio as gr  # noqa: E402
from gradio import utils as gr_utils  # noqa: E402
from PIL import Image  # noqa: E402

from resnext_hub import processing  # noqa: E402
from resnext_hub.console import printable  # noqa: E402
from resnext_hub.models import CheckpointError, list_models  # noqa: E402
from resnext_hub.models.finetuned import read_finetuned_meta  # noqa: E402
from resnext_hub.models.hf_config import is_hf_folder  # noqa: E402
from resnext_hub.models.openvino_ir import openvino_ir_path, read_openvino_ir  # noqa: E402
from resnext_hub.models.optimize import PRECISIONS  # noqa: E402
from resnext_hub.models.registry import architecture_of  # noqa: E402
from resnext_hub.processing.fetch import FetchError, URLRefusedError, is_public_address  # noqa: E402
from resnext_hub.processing.images import read_source  # noqa: E402
from resnext_hub.processing.overlay import overlay  # noqa: E402
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
CONCURRENCY = 2  # inferences at once (decoding, preprocessing, the model)
URL_CONCURRENCY = 4  # URL requests at once: they wait on other servers, in their own slots
SAMPLES = REPO / "assets" / "images"
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _Refused(Exception):
    """A request refused with a message for the visitor: ``(title, message)``."""


def _error(message: str, title: str) -> gr.Error:
    """A message for the visitor; expected failures need no traceback in the server log."""
    return gr.Error(message, title=title, print_exception=False)


def _readable_upload(path: Any) -> bool:
    """Whether a file value names a file this app may read: one in Gradio's upload folder, or a sample photo."""
    if not isinstance(path, str):
        return False
    real = Path(os.path.realpath(path))
    roots = (Path(os.path.realpath(gr_utils.get_upload_folder())), Path(os.path.realpath(SAMPLES)))
    return any(real.is_relative_to(root) for root in roots)


def _short(text: str, limit: int = 160) -> str:
    # Messages echo bits of visitor input: keep them short and free of markup.
    text = text.replace("<", "‹").replace(">", "›")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DemoBlocks(gr.Blocks):
    """The page's ``gr.Blocks``, with one change: a request whose values its inputs cannot take (Gradio checks an
    API client's values against each input's data model before any handler runs) gets a short message, where
    Gradio would answer with an empty error and log a traceback."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as error:
            log.warning("a request's values were refused: %s", printable(failure_reason(error)))
            message = (
                "The request's values are not what this app takes: a model name, and a photo (a file value) or a URL."
            )
            raise _error(message, "Bad request") from None


class Demo:
    """The app's state (model cache, worker pool) and its request handlers."""

    def __init__(
        self, default_model: str | None = None, precision: str | None = None, checkpoint: str | Path | None = None
    ) -> None:
        precision = precision or os.environ.get(PRECISION_ENV) or "auto"
        if precision not in PRECISIONS:
            raise SystemExit(f"{PRECISION_ENV}={precision!r} is not a precision; expected one of {PRECISIONS}")
        if checkpoint is not None:
            checkpoint = Path(checkpoint).expanduser()
            self.entries = [checkpoint_entry(checkpoint, default_model)]  # the one model served
        else:
            self.entries = list_models()
        wanted = self.entries[0] if checkpoint is not None else default_model or os.environ.get(DEFAULT_MODEL_ENV)
        wanted = wanted or DEFAULT_MODEL
        if wanted not in self.entries:
            raise SystemExit(f"{DEFAULT_MODEL_ENV}={wanted!r} is not a served model; expected one of {self.entries}")
        self.default_model = wanted
        self.models = ModelCache(REPO, self.entries, precision, checkpoint)
        # At most CONCURRENCY requests decode and infer at once; Gradio's bounded queue holds the rest.
        self.workers = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="classify")
        # Which resolved addresses a visitor's URL may reach: public ones only (tests swap in loopback).
        self.url_policy = is_public_address
        self._in_flight = 0
        self._stopping = False
        self._changed = threading.Condition()

    # -- request handlers (called by Gradio with raw, unpreprocessed values: anything an API client sends) --

    def classify_upload(self, entry: str, upload: dict | None) -> tuple[Any, dict, str, Any]:
        """Top-5 of an uploaded, pasted or example photo (with the photo, the card and the top-1's explanation)."""
        path = upload.get("path") if isinstance(upload, dict) else None
        if not path:
            raise _error("Upload or paste a photo first (or pick one of the sample photos).", "No photo")
        with self._admitted():
            self._served(entry)  # a bad entry, or a model still loading, is said before the file is looked at
            if not _readable_upload(path):
                # Gradio hands an API client's file value over as it came: unchecked, any server file could be read.
                message = "That photo was not uploaded to this app: upload it first (or pick a sample)."
                raise _error(message, "No photo")
            return self._classify(
                entry,
                lambda min_size: processing.load_image(
                    path, min_size=min_size, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS
                ),
            )

    def classify_url(self, entry: str, url: str | None) -> tuple[Any, dict, str, Any]:
        """Top-5 of the image at a public http(s) URL. The image is fetched in this (the URL slots') thread, so that
        a slow server holds a URL slot, never an inference slot; it is decoded like an upload."""
        url = url.strip() if isinstance(url, str) else ""
        if not url:
            raise _error("Paste the address of an image (http:// or https://) first.", "No URL")
        with self._admitted():
            self._served(entry)  # a bad entry, or a model still loading, is said before anything is fetched
            limits = {"max_bytes": MAX_UPLOAD_BYTES, "deadline_s": URL_DEADLINE_S}
            try:
                data = read_source(url, allow=self.url_policy, **limits)
            except Exception as error:
                title, message = _refusal(error).args
                raise _error(message, title) from None
            return self._classify(
                entry, lambda min_size: processing.load_image(data, min_size=min_size, max_pixels=MAX_PIXELS)
            )

    def describe(self, entry: str) -> str:
        """The model card of ``entry`` (loads the model if needed)."""
        with self._admitted():
            return self._served(entry).card

    # -- a graceful stop --

    def stop(self, timeout_s: float) -> bool:
        """Refuse new requests (a short message) and wait up to ``timeout_s`` for those in flight; True if none is
        left."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._stopping = True
            while self._in_flight and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return not self._in_flight

    def close(self) -> None:
        """Let go of the worker threads (work already running finishes on its own)."""
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.models.close()

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """The block of one request, counted while it runs; refused once the server is stopping."""
        with self._changed:
            if self._stopping:
                raise _error("The server is restarting; try again in a minute.", "Server restarting")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    # -- internals --

    def _served(self, entry: str) -> Served:
        if not isinstance(entry, str) or entry not in self.entries:
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

    def _classify(self, entry: str, load: Callable[[int | None], Image.Image]) -> tuple[Any, dict, str, Any]:
        """Run ``load(min_size)`` (decoding at the served engine's ``decode_size``) and the model, with time limits."""
        served = self._served(entry)
        started = time.perf_counter()
        future = self.workers.submit(self._run, served, load)
        try:
            photo, ranked, explained = future.result(timeout=REQUEST_TIME_LIMIT_S)
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
        return photo, top5_dict(ranked), served.card, explained

    def _run(
        self, served: Served, load: Callable[[int | None], Image.Image]
    ) -> tuple[Image.Image, list, Image.Image | None]:
        try:
            image = load(served.engine.decode_size)
        except Exception as error:  # anything reading or decoding raised: this photo only
            raise _refusal(error) from None
        try:
            prepared = served.prepare(image)
        except Exception as error:  # the preprocessing of this photo
            raise _unprocessable(error) from None
        ranked, heat = served.top5_explained(prepared)
        shown = image.copy()
        shown.thumbnail((512, 512))
        # Drawn on the shown copy: the crop's place scales with the photo, and the small copy is cheaper to blend.
        explained = overlay(shown, heat, served.engine.model) if heat is not None else None  # its preset
        return shown, ranked, explained


def checkpoint_entry(checkpoint: Path, model: str | None = None) -> str:
    """The hub entry that loads ``checkpoint``: the architecture a fine-tuned file names, or ``model``.

    ``SystemExit`` with the reason when the file is missing, names another architecture than ``model``,
    or names none and ``model`` is not given.
    """
    ir = openvino_ir_path(checkpoint)
    if not (checkpoint.is_file() or is_hf_folder(checkpoint) or ir is not None):
        raise SystemExit(
            f"--checkpoint {checkpoint} does not exist (or is neither a file nor an hf or openvino export folder)"
        )
    try:
        # export --format openvino's IR is read (not compiled) for its architecture; other files by torch.
        meta = read_openvino_ir(ir)[1] if ir is not None else read_finetuned_meta(checkpoint)
    except (CheckpointError, ImportError) as error:  # ImportError: an IR, and no openvino installed
        raise SystemExit(f"--checkpoint: {error}") from None
    try:
        architecture = architecture_of(model) if model is not None else None
    except ValueError as error:
        raise SystemExit(f"--model: {error}") from None
    if meta is not None and architecture not in (None, meta.architecture):
        raise SystemExit(
            f"--checkpoint {checkpoint} was fine-tuned from {meta.architecture}, not {architecture}: "
            f"leave --model out (or give --model {meta.architecture})"
        )
    architecture = architecture or (meta.architecture if meta is not None else None)
    if architecture is None:
        raise SystemExit(f"--checkpoint {checkpoint} does not say which architecture it holds: add --model NAME")
    if model in list_models():
        return model
    return next(entry for entry in list_models() if architecture_of(entry) == architecture)


def _refusal(error: Exception) -> _Refused:
    """The visitor's message for an image that could not be fetched or read."""
    if not isinstance(error, processing.InvalidImageError):
        return _unprocessable(error)
    cause = error.__cause__  # the FetchError, for a URL that gave no body
    if isinstance(cause, URLRefusedError):
        return _Refused("Address not allowed", _short(f"That URL is not allowed: {cause.reason}."))
    if isinstance(cause, FetchError):
        return _Refused("Could not fetch the image", _short(f"Could not fetch that URL: {cause.reason}."))
    reason = re.sub(r" \(first bytes .*\)$", "", error.reason)
    return _Refused("Not a usable image", _short(f"That file is not a usable image: {reason}."))


def _unprocessable(error: Exception) -> _Refused:
    """The visitor's message for a photo that failed in an unexpected way: its type and message, short."""
    log.warning("a photo could not be processed: %s", failure_reason(error))
    message = f"That image could not be processed ({failure_reason(error)})."
    return _Refused("Could not process the image", _short(message))


def top5_dict(ranked: list) -> dict[str, float]:
    """``{label: probability}`` for gr.Label; a label seen twice (ImageNet has two "crane"s) gets its index.

    Labels are shown as :func:`resnext_hub.console.printable` writes them: valid text on one line
    (a class name from a folder name may hold bytes that are not UTF-8, or control characters).
    """
    shown: dict[str, float] = {}
    for prediction in ranked:
        label = printable(prediction.label)
        name = label if label not in shown else f"{label} (#{prediction.index})"
        shown[name] = prediction.probability
    return shown


def sample_photos() -> list[str]:
    return [str(p) for p in sorted(SAMPLES.iterdir()) if p.suffix.lower() in SAMPLE_SUFFIXES]


def build(demo_state: Demo) -> DemoBlocks:
    """The page: model picker, photo/URL input, photo + explanation overlay + top-5 + model card."""
    inference = {"concurrency_id": "inference", "concurrency_limit": CONCURRENCY, "preprocess": False}
    with DemoBlocks(title="resnext-hub demo", analytics_enabled=False) as blocks:
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
                with gr.Row():
                    photo_out = gr.Image(label="Photo", interactive=False, elem_id="photo-output")
                    explanation = gr.Image(label="Top class: evidence", interactive=False, elem_id="explanation-output")
                top5 = gr.Label(num_top_classes=5, label="Top-5", elem_id="top5")
                card = gr.Markdown(elem_id="model-card")
        outputs = [photo_out, top5, card, explanation]
        classify_photo.click(demo_state.classify_upload, [model, photo_in], outputs, api_name="classify", **inference)
        examples.load_input_event.then(demo_state.classify_upload, [model, photo_in], outputs, **inference)
        by_url = {**inference, "concurrency_id": "url", "concurrency_limit": URL_CONCURRENCY}
        classify_url.click(demo_state.classify_url, [model, url_in], outputs, api_name="classify_url", **by_url)
        url_in.submit(demo_state.classify_url, [model, url_in], outputs, **by_url)
        model.change(demo_state.describe, [model], [card], preprocess=False, concurrency_id="load")
        blocks.load(demo_state.describe, [model], [card], preprocess=False, concurrency_id="load")
    return blocks


if __name__ == "__main__":
    # ``python -m space.app``, the documented command. This file runs as ``__main__`` here, not as ``space.app``:
    # the server imports the page module by its name, so ``space.app`` itself never imports the server.
    from space.server import main

    main()
