"""The one inference engine: a model on its device and fast path, fed decoded batches, ranked with its class names.

``classify``, ``predict``, ``evaluate``, ``serve`` (both Triton models) and the web demo all run
their models through :class:`Engine`. Inputs are decoded by the hardened loader in threads of
this process, one per usable CPU by default, ahead of the model (the next batches decode while the model
runs this one; Pillow's decoders and resampling release the GIL, and no process is forked next to a
runtime's thread pool: measured faster than DataLoader worker processes, see benchmarks/README.md); large
photos are decoded at the size the preset needs (``Engine.decode_size``; ``options.exact_decode``
decodes every pixel, see ``processing.images``). An input that is
not a usable image, or that makes decoding or preprocessing raise anything else, comes back as a
:class:`~resnext_hub.results.Result` with its reason, never as an exception (``KeyboardInterrupt``
and ``SystemExit`` still stop the run). ``k`` above the model's class count means all its classes
(:func:`clamp_top_k`), in every command. :meth:`Engine.explain` and :meth:`Engine.explain_items` give
explanation maps (``models.explain``) with the logits from the same pass of the fast path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
from PIL import Image

from .decoding import Batch, ImageListDataset, collate
from .models import ResNet
from .models.explain import Explanation, Target, head_linear
from .options import InferenceOptions
from .processing import Prediction, top_k
from .processing.overlay import overlay
from .results import Result

DEVICES = "auto, cpu, cuda or cuda:N"
PREFETCH_BATCHES = 2  # decoded ahead of the batch the model runs


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; anything but a CPU or a present GPU is a ``ValueError`` that says so."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device name: expected {DEVICES}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device {str(device)!r} requested but this machine has {count} CUDA device(s): "
                f"use cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}"
            )
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} requested but MPS is not available; use --device cpu")
    elif resolved.type != "cpu":
        raise ValueError(f"device {str(device)!r} cannot run the models: expected {DEVICES}")
    return resolved


def clamp_top_k(k: int, num_classes: int) -> int:
    """How many classes a top-``k`` gives: ``k``, or all of them when ``k`` is larger; ``k`` must be >= 1."""
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    return min(k, num_classes)


class Scored(NamedTuple):
    """One batch run through the model."""

    indices: list[int]  # of the rows of ``logits``
    logits: torch.Tensor | None  # fp32, on the CPU; None when no input of the batch was usable
    targets: torch.Tensor | None
    failed: list[tuple[int, str]]  # (index, reason) of the unusable inputs


class Engine:
    """One model ready for inference as ``options`` (:class:`~resnext_hub.options.InferenceOptions`) say: on
    their ``device``, on its fast path, with its preset and class names.

    The model runs through ``model.optimize_for_inference(options.precision)``: ``"auto"`` (bf16 on CPUs
    with native bf16, fp16 on CUDA, else fp32; checked faithful) or an explicit ``"fp32"`` (exact),
    ``"bf16"`` or ``"fp16"``. ``self.precision`` is what it runs in. ``options.calibration`` (image
    paths/URLs, PIL images or preprocessed batches) enables ``"int8"`` on CPUs with VNNI/AMX, explicitly or
    as ``"auto"``'s first choice (see ``optimize_for_inference``). ``options.workers`` decode the inputs,
    and ``options.batch_size`` and ``options.top_k`` are :meth:`classify`'s defaults. Inputs decode at the
    preset's resize target (``decode_size``, see ``processing.load_image``'s ``min_size``);
    ``options.exact_decode`` decodes every pixel (``decode_size`` None).
    """

    def __init__(self, model: ResNet, options: InferenceOptions | None = None) -> None:
        self.options = options = options or InferenceOptions()
        self.device = resolve_device(options.device)
        self.classes = model.classes  # a head without classes (model.fc = nn.Identity()) is refused here, not mid-run
        # A multi-label head's per-label thresholds (ranked by sigmoid, not softmax); None: single-label.
        self.thresholds: tuple[float, ...] | None = model.thresholds
        self.model = (
            model.eval()
            .to(self.device)
            .optimize_for_inference(
                precision=options.precision,
                compile=options.compile,
                calibration=options.calibration,
                batch_size=options.batch_size,  # "auto" is timed (and its choice cached) for this batch regime
            )
        )
        self.precision: str = self.model.precision
        self.preprocessing = self.model.preprocessing
        # What the loader is asked for: the short side the preset resizes to (None: every pixel).
        self.decode_size: int | None = None if options.exact_decode else self.preprocessing.resize_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multi_label(self) -> bool:
        """Whether the model is multi-label: sigmoid probabilities, each label present at or above its threshold."""
        return self.thresholds is not None

    def clamp_k(self, k: int) -> int:
        """The top-``k`` this model gives (:func:`clamp_top_k`); a multi-label model gives every label's."""
        k = clamp_top_k(k, self.num_classes)
        return self.num_classes if self.multi_label else k

    # -- tensors in -------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits (on the CPU) of a batch of preprocessed images."""
        return self.model(images.to(self.device, non_blocking=True)).float().cpu()

    def top_k(self, images: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """The ``k`` best classes of each preprocessed image, named by the model's classes."""
        return self.rank(self.logits(images), k)

    def rank(self, logits: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """Logits -> the ``k`` best classes of each row (softmax; a multi-label model's: every label, by sigmoid)."""
        if self.multi_label:
            return top_k(logits.float().sigmoid(), self.num_classes, labels=self.classes)
        return top_k(logits, k, logits=True, labels=self.classes)

    # -- explanation maps ---------------------------------------------------------------------------

    def check_explainable(self) -> None:
        """A ``ValueError`` saying why, where this engine's model cannot give explanation maps: the int8 copy (its
        backend compiles the whole network, the last stage's maps never come out), or a head that is not linear
        on average-pooled features (``models.explain.head_linear``'s ``HeadError``)."""
        explanation = getattr(self.model, "explanation", None)
        if explanation is None:
            raise ValueError(
                f"explanation maps need the last stage's feature maps, and the {self.precision} copy of the model "
                "(compiled whole by its backend) does not give them out: use precision fp32 or bf16 (or auto "
                "without calibration images)"
            )
        fc, pool = self.model.fc, getattr(self.model, "global_pool", None)
        head_linear(fc, getattr(pool, "pool_type", "avg"))

    @torch.inference_mode()
    def explain(self, images: torch.Tensor, target: Target = None) -> Explanation:
        """Class activation maps (see ``models.explain``) of a batch of preprocessed images, for each one's top-1
        class or ``target``, with the logits, from one pass of the fast path; on the CPU, fp32."""
        self.check_explainable()
        maps, classes, logits = self.model.explanation(images.to(self.device, non_blocking=True), target)
        return Explanation(maps.float().cpu(), classes.cpu(), logits.float().cpu())

    def explain_items(
        self, items: Sequence[str | bytes], *, batch_size: int | None = None, k: int | None = None
    ) -> Iterator[tuple[Result, Image.Image | None]]:
        """:meth:`classify`'s results, each with the overlay of its top-1 class's map on its photo (as decoded, at
        its aspect ratio: ``processing.overlay``), or None for an input that failed."""
        self.check_explainable()
        batch_size = batch_size or self.options.batch_size
        k = self.clamp_k(self.options.top_k if k is None else k)
        batches = [range(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
        for batch in self.decoded(items, batches, photos=True):
            done: dict[int, tuple[Result, Image.Image | None]]
            done = {i: (Result(items[i], error=reason), None) for i, reason in batch.failed}
            if batch.images is not None:
                explained = self.explain(batch.images)
                ranked = self.rank(explained.logits, k)
                present = self.above_threshold(explained.logits) if self.multi_label else [None] * len(ranked)
                for row, i in enumerate(batch.indices):
                    picture = overlay(batch.photos[row], explained.maps[row], self.preprocessing)
                    done[i] = (Result(items[i], predictions=ranked[row], labels=present[row]), picture)
            for i in sorted(done):
                yield done[i]

    def above_threshold(self, logits: torch.Tensor) -> list[tuple[str, ...]]:
        """A multi-label model's labels at or above their thresholds, per row, in label order."""
        if self.thresholds is None:
            raise ValueError("the model is not multi-label: it has no per-label thresholds")
        present = logits.float().sigmoid() >= torch.tensor(self.thresholds)
        return [tuple(self.classes.names[i] for i in row.nonzero().flatten().tolist()) for row in present]

    # -- inputs in (paths, URLs, encoded bytes) -----------------------------------------------------

    def decoded(
        self,
        items: Sequence[str | bytes],
        batches: Sequence[Sequence[int]],
        *,
        targets: Sequence[int] | None = None,
        workers: int | None = None,
        photos: bool = False,
    ) -> Iterator[Batch]:
        """Decoded batches of ``items`` by index, in ``workers`` (default ``options.workers``; at least one) threads
        of this process, ahead of the consumer. ``photos``: keep the decoded photos (``Batch.photos``)."""
        workers = self.options.workers if workers is None else workers
        dataset = ImageListDataset(items, self.preprocessing, targets, min_size=self.decode_size, keep_photos=photos)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            # The next batches are queued before this one is handed over, so they decode while the model runs it.
            pending: deque[list[Future]] = deque()
            queue = iter(batches)

            def submit_next() -> None:
                batch = next(queue, None)
                if batch is not None:
                    pending.append([pool.submit(dataset.__getitem__, index) for index in batch])

            try:
                for _ in range(1 + PREFETCH_BATCHES):
                    submit_next()
                while pending:
                    futures = pending.popleft()
                    submit_next()
                    yield collate([future.result() for future in futures])
            finally:  # a consumer that stops early: what has not started decoding never will
                for futures in pending:
                    for future in futures:
                        future.cancel()

    def score(
        self,
        items: Sequence[str | bytes],
        batches: Sequence[Sequence[int]],
        *,
        targets: Sequence[int] | None = None,
        workers: int | None = None,
    ) -> Iterator[Scored]:
        """Run each batch of :meth:`decoded` through the model."""
        for batch in self.decoded(items, batches, targets=targets, workers=workers):
            logits = self.logits(batch.images) if batch.images is not None else None
            yield Scored(batch.indices, logits, batch.targets, batch.failed)

    def classify_batches(
        self,
        items: Sequence[str | bytes],
        batches: Sequence[Sequence[int]],
        *,
        k: int = 5,
        workers: int | None = None,
    ) -> Iterator[list[tuple[int, Result]]]:
        """Per batch, ``(index, Result)`` of each of its inputs, by index."""
        for scored in self.score(items, batches, workers=workers):
            results = {i: Result(items[i], error=reason) for i, reason in scored.failed}
            if scored.logits is not None:
                present = self.above_threshold(scored.logits) if self.multi_label else [None] * len(scored.indices)
                for i, ranked, labels in zip(scored.indices, self.rank(scored.logits, k), present):
                    results[i] = Result(items[i], predictions=ranked, labels=labels)
            yield sorted(results.items(), key=lambda pair: pair[0])

    def classify(
        self, items: Sequence[str | bytes], *, batch_size: int | None = None, k: int | None = None
    ) -> Iterator[Result]:
        """One :class:`Result` per input, in order, decoding in ``options.workers`` threads (URLs wait on the
        network); ``batch_size`` and ``k`` default to the options' (``k`` above the class count: all)."""
        batch_size = batch_size or self.options.batch_size
        k = self.clamp_k(self.options.top_k if k is None else k)
        batches = [range(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
        for batch in self.classify_batches(items, batches, k=k):
            for _, result in batch:
                yield result
