"""What the demo serves: models loaded through torch.hub, cached, warmed up, and their cards.

Models are loaded exactly as users load them, ``torch.hub.load(<repo>, <entry>, source="local")``,
then turned into the fast inference copy where the model offers ``optimize_for_inference``.
Loads run one at a time in a background thread (a 101-layer model from the network can take
minutes); a request waits a bounded time for its model, then gets a "still loading" message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("resnext_hub.space")

# hub entry points that are not a distinct model: the processing utilities, and an alias.
NOT_MODELS = frozenset({"nvidia_convnets_processing_utils", "nvidia_resneXt"})
PRECISION_ENV = "RESNEXT_HUB_SPACE_PRECISION"


class ModelNotReadyError(RuntimeError):
    """The model is still loading (downloading its weights); the visitor should retry shortly."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded (weights unavailable or invalid); details are in the server log."""


def hub_entries(repo: Path) -> list[str]:
    """The model entry points of ``hubconf.py`` (torch.hub.list has no local source)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_resnext_hub_space_hubconf", repo / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
    return [n for n in names if callable(getattr(module, n, None)) and n not in NOT_MODELS]


@dataclass
class Served:
    """One loaded model, ready for requests."""

    entry: str
    model: torch.nn.Module
    transform: Any
    device: torch.device
    precision: str
    card: str
    load_s: float


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:g}%"


def model_card(entry: str, model: torch.nn.Module, precision: str, device: torch.device) -> str:
    """Markdown card: parameters, published accuracy, license, weights source, preprocessing, inference path."""
    record = getattr(model, "weights_record", None)
    params = sum(p.numel() for p in model.parameters())
    lines = [f"### `{entry}`", "", f"- **Architecture:** {getattr(model, 'architecture', '?')}, {params:,} parameters"]
    if record is not None:
        for key, metric in record.metrics.items():
            accuracy = f"top-1 {_percent(metric.get('top1'))}, top-5 {_percent(metric.get('top5'))}"
            lines.append(f"- **Published accuracy, {key}:** {accuracy} ({metric.get('source', '')})")
        lines.append(f"- **License:** {record.license}")
        mirror = "; read here from `RESNEXT_HUB_WEIGHTS_MIRROR`" if _mirror_set() else ""
        lines.append(f"- **Weights:** `{record.name}`, [{record.file_name}]({record.url}){mirror}")
        lines.append(f"- **Provenance:** {record.provenance}")
    else:
        lines.append("- **Weights:** none recorded (random or local file)")
    spec = getattr(model, "preprocessing", None)
    if spec is not None:
        lines.append(
            f"- **Preprocessing:** resize {spec.resize_size} ({spec.interpolation}), center crop {spec.crop_size}, "
            "ImageNet mean/std"
        )
    lines.append(f"- **Inference:** {precision} on {device.type}")
    return "\n".join(lines)


def _mirror_set() -> bool:
    return bool(os.environ.get("RESNEXT_HUB_WEIGHTS_MIRROR"))


class ModelCache:
    """Loads each hub entry once (in the background), keeps it, and hands it to requests."""

    def __init__(self, repo: Path, entries: list[str], processing: Any, precision: str | None = None) -> None:
        self.repo = repo
        self.entries = entries
        self.processing = processing
        self.precision = precision or os.environ.get(PRECISION_ENV, "auto")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    def _load(self, entry: str) -> Served:
        started = time.perf_counter()
        model = torch.hub.load(str(self.repo), entry, source="local", trust_repo=True, verbose=False)
        model = model.eval().to(self.device)
        transform = model.preprocessing
        fast, how = model, "plain eager fp32"
        optimize = getattr(model, "optimize_for_inference", None)
        if optimize is not None:
            try:
                fast = optimize(precision=self.precision)
                how = f"optimize_for_inference(precision={self.precision!r}) → {getattr(fast, 'precision', '?')}"
            except Exception:  # the plain model still gives the right answers, only slower
                log.exception("optimize_for_inference failed for %s; serving the plain model", entry)
        # The card describes the published model (its parameters), not the inference copy.
        served = Served(entry, fast, transform, self.device, how, model_card(entry, model, how, self.device), 0.0)
        crop = getattr(getattr(model, "preprocessing", None), "crop_size", 224)
        self.predict(served, torch.zeros(1, 3, crop, crop))  # warm-up: first calls pay for allocations
        served.load_s = time.perf_counter() - started
        log.info("loaded %s in %.1f s (%s)", entry, served.load_s, how)
        return served

    @torch.inference_mode()
    def predict(self, served: Served, batch: torch.Tensor, k: int = 5) -> list:
        """Top-``k`` predictions (``processing.Prediction``) of the first image of ``batch``."""
        logits = served.model(batch.to(served.device))
        return self.processing.top_k(logits.float(), k, logits=True)[0]
