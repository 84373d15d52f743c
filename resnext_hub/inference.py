"""A ready-to-use classifier: model + its preprocessing + device/precision, for the CLI and apps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import ResNet
from .processing import InvalidImageError, Prediction, load_image, top_k

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """URLs and files as given; folders become their image files (recursively, sorted)."""
    expanded = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            expanded += [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        else:
            expanded.append(item)
    return expanded


@dataclass
class Result:
    """The outcome for one input: its top-k, or the reason it could not be classified."""

    input: str
    predictions: list[Prediction] | None = None
    error: str | None = None


class Classifier:
    """Classify images with one model: decoding in threads, batched inference on the fast path.

    The model runs through ``model.optimize_for_inference``: ``precision="auto"`` (bf16 on CPUs
    with native bf16, fp16 on CUDA, else fp32; checked faithful), or exact fp32 with
    ``exact=True`` (``amp=False`` does the same on CUDA).
    """

    def __init__(
        self,
        model: ResNet,
        *,
        device: str = "auto",
        amp: bool = True,
        workers: int = 4,
        exact: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        model = model.eval().to(self.device)
        self.transform = model.preprocessing
        self.classes = model.classes
        self.workers = workers
        exact = exact or (not amp and self.device.type == "cuda")
        self.model = model.optimize_for_inference(precision="fp32" if exact else "auto", compile=compile)
        self.precision: str = self.model.precision

    def _prepare(self, item: str) -> torch.Tensor | str:
        try:
            return self.transform(load_image(item))
        except InvalidImageError as error:
            return error.reason

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        batch = batch.to(self.device, non_blocking=True)
        return top_k(self.model(batch).float(), k, logits=True, labels=self.classes)

    def classify(self, inputs: Sequence[str], *, batch_size: int = 16, k: int = 5) -> Iterator[Result]:
        """Yield one :class:`Result` per input, in order; bad inputs give an error, not an exception."""
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start : start + batch_size]
                prepared = list(pool.map(self._prepare, chunk))
                good = [t for t in prepared if isinstance(t, torch.Tensor)]
                ranked = iter(self.predict_tensor(torch.stack(good), k) if good else [])
                for item, tensor in zip(chunk, prepared):
                    if isinstance(tensor, torch.Tensor):
                        yield Result(item, predictions=next(ranked))
                    else:
                        yield Result(item, error=tensor)
