"""What the demo serves: models loaded through torch.hub and run by the inference engine, cached, and their cards.

Models are loaded exactly as users load them, ``torch.hub.load(<repo>, <entry>, source="local")``
(with ``pretrained_from_file=<checkpoint>`` for a local checkpoint, e.g. ``finetune``'s ``best.pth``),
and run by :class:`resnext_hub.engine.Engine` (the fast path, ``optimize_for_inference``).
Loads run one at a time in a background thread (a 101-layer model from the network can take
minutes); a request waits a bounded time for its model, then gets a "still loading" message.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from resnext_hub.console import printable
from resnext_hub.engine import Engine
from resnext_hub.models import MIRROR_ENV, ResNet
from resnext_hub.models.openvino_ir import OpenVINOResNet, load_openvino_ir, openvino_ir_path
from resnext_hub.models.registry import architecture_of
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import Prediction

log = logging.getLogger("resnext_hub.space")

PRECISION_ENV = "RESNEXT_HUB_SPACE_PRECISION"
_CARD_CLASSES = 10  # class names listed on a local checkpoint's card
_MARKDOWN = re.compile(r"[\\`*_\[\]<>&!|~$]")  # what Markdown (emphasis, links, code, math) or HTML acts on


class ModelNotReadyError(RuntimeError):
    """The model is still loading (downloading its weights); the visitor should retry shortly."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded (weights unavailable or invalid); details are in the server log."""


@dataclass
class Served:
    """One loaded model, ready for requests."""

    entry: str
    engine: Engine
    card: str
    load_s: float = 0.0

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The model's input for a decoded RGB image (its preprocessing): the per-image step."""
        return self.engine.preprocessing(image)

    def top5_of(self, prepared: torch.Tensor) -> list[Prediction]:
        """The five best classes of one image :meth:`prepare` gave."""
        return self.engine.top_k(prepared[None], 5)[0]

    def top5_explained(self, prepared: torch.Tensor) -> tuple[list[Prediction], torch.Tensor | None]:
        """:meth:`top5_of`, and the explanation map of the first class from the same pass; None where the model
        cannot give one (an int8 copy, a head that is not linear: ``Engine.check_explainable``)."""
        try:
            self.engine.check_explainable()
        except ValueError:
            return self.top5_of(prepared), None
        explained = self.engine.explain(prepared[None])
        return self.engine.rank(explained.logits, 5)[0], explained.maps[0]


def markdown_text(text: object) -> str:
    """``text`` as literal running text in Markdown, on one line: :func:`resnext_hub.console.printable` (valid
    text, control characters escaped), and every character that Markdown or HTML would act on backslash-escaped
    (names come from the file system and may hold anything)."""
    return _MARKDOWN.sub(lambda match: "\\" + match.group(), printable(text))


def markdown_code(text: object) -> str:
    """``text`` as a Markdown code span on one line (its content is literal there, backticks included)."""
    text = printable(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:g}%"


def model_card(
    entry: str, model: ResNet | OpenVINOResNet, engine: Engine, precision: str, checkpoint: Path | None = None
) -> str:
    """Markdown card: parameters, published accuracy, license, weights source (or the local checkpoint and its
    classes), preprocessing, inference path."""
    record = model.weights_record
    if isinstance(model, OpenVINOResNet):
        shape = f"a saved OpenVINO IR in {model.precision}"
    else:
        shape = f"{sum(p.numel() for p in model.parameters()):,} parameters"
    lines = [f"### `{entry}`", "", f"- **Architecture:** {model.architecture}, {shape}"]
    if checkpoint is not None:
        names = model.classes.names
        shown = ", ".join(map(markdown_text, names[:_CARD_CLASSES])) + (", …" if len(names) > _CARD_CLASSES else "")
        where = markdown_code(checkpoint.name)
        lines.append(f"- **Weights:** local checkpoint {where}, {len(names)} classes: {shown}")
        if model.multi_label:
            limits = ", ".join(f"{markdown_text(n)} {t:.2f}" for n, t in zip(names[:_CARD_CLASSES], model.thresholds))
            lines.append(f"- **Multi-label:** each label's sigmoid probability; present at or above: {limits}")
    elif record is not None:
        for key, metric in record.metrics.items():
            accuracy = f"top-1 {_percent(metric.get('top1'))}, top-5 {_percent(metric.get('top5'))}"
            lines.append(f"- **Published accuracy, {key}:** {accuracy} ({metric.get('source', '')})")
        lines.append(f"- **Publisher:** {record.publisher}; **license:** {record.license}")
        mirror = f"; read here from `{MIRROR_ENV}`" if os.environ.get(MIRROR_ENV) else ""
        lines.append(f"- **Weights:** `{record.name}`, [{record.file_name}]({record.url}){mirror}")
        lines.append(f"- **Provenance:** {record.provenance}")
    else:
        lines.append("- **Weights:** none recorded (random or local file)")
    lines.append(f"- **Preprocessing:** {model.preprocessing.describe()}")
    if isinstance(model, OpenVINOResNet):
        lines.append(f"- **Inference:** OpenVINO, {engine.precision} as saved, on {engine.device.type}")
    else:
        lines.append(
            f"- **Inference:** optimize_for_inference(precision={precision!r}) → {engine.precision} on "
            f"{engine.device.type}"
        )
    return "\n".join(lines)


class ModelCache:
    """Loads each hub entry once (in the background), keeps it, and hands it to requests.

    With ``checkpoint``, every entry loads its weights (and class names) from that local file.
    """

    def __init__(self, repo: Path, entries: list[str], precision: str = "auto", checkpoint: Path | None = None) -> None:
        self.repo = repo
        self.entries = entries
        self.precision = precision
        self.checkpoint = checkpoint
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

    def start(self, entry: str) -> Future:
        """Begin loading ``entry`` unless it is loaded or loading; a failed load is retried."""
        if entry not in self.entries:
            raise ValueError(f"unknown model {entry!r}; expected one of {self.entries}")
        with self._lock:
            future = self._futures.get(entry)
            if future is None or (future.done() and future.exception() is not None):
                future = self._futures[entry] = self._loader.submit(self._load, entry)
            return future

    def get(self, entry: str, wait_s: float) -> Served:
        """The loaded model, waiting at most ``wait_s`` for a load in progress."""
        future = self.start(entry)
        try:
            return future.result(timeout=wait_s)
        except FutureTimeout:
            raise ModelNotReadyError(entry) from None
        except Exception as error:
            log.exception("loading %s failed", entry)
            raise ModelLoadError(entry) from error

    def close(self) -> None:
        """Start no more loads (one already running finishes on its own)."""
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _load(self, entry: str) -> Served:
        started = time.perf_counter()
        ir = openvino_ir_path(self.checkpoint) if self.checkpoint is not None else None
        if ir is not None:  # export --format openvino's IR: compiled as saved (its precision; on the CPU)
            model = load_openvino_ir(ir, architecture=architecture_of(entry))
            engine = Engine(model, InferenceOptions(precision="auto", device="cpu"))
        else:
            local = {} if self.checkpoint is None else {"pretrained_from_file": str(self.checkpoint)}
            model = torch.hub.load(str(self.repo), entry, source="local", trust_repo=True, verbose=False, **local)
            engine = Engine(model, InferenceOptions(precision=self.precision))
        # The card describes the published model (its parameters), not the inference copy.
        served = Served(entry, engine, model_card(entry, model, engine, self.precision, self.checkpoint))
        crop = engine.preprocessing.crop_size
        engine.top_k(torch.zeros(1, 3, crop, crop))  # warm-up: first calls pay for allocations
        served.load_s = time.perf_counter() - started
        log.info("loaded %s in %.1f s (%s)", entry, served.load_s, engine.precision)
        return served
