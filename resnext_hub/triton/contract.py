"""The Triton contract: what resnext-hub's Triton models take and answer, declared once.

Both Triton servers are generated from it: ``serve`` (PyTriton's tensor specs, :mod:`.server`) and
the exported model repository (every ``config.pbtxt`` and the ensembles' wiring, :mod:`.config`).
A model name means the same inputs and outputs in both, so one client works against either.

A classifier served as ``<name>`` publishes two models (dims are per sample; the batch axis comes
first and is not counted):

- ``<name>``: input ``input`` FP32 ``(3, S, S)``, the preprocessed image;
- ``<name>_image``: input ``image`` BYTES ``(1,)``, the encoded file (JPEG, PNG, WebP, ...);
- both answer ``labels`` BYTES ``(k,)``, ``probabilities`` FP32 ``(k,)``, ``indices`` INT64 ``(k,)``
  and ``error`` BYTES ``(1,)``.

``S`` is the weights' crop size; ``k`` the served top-k, at most the class count (callers clamp it,
:func:`resnext_hub.engine.clamp_top_k`).

A multi-label model (``Contract.thresholds``: one per label) answers every label (``k`` is the label
count), ``probabilities`` are each label's sigmoid (not a softmax), and one more output,
``above_threshold`` BOOL ``(k,)``, says for each listed label whether its probability is at or above
its threshold (False for a failed sample). Each sample's top-k is best first; ``labels`` are the
model's own class names (a fine-tuned checkpoint's), always valid UTF-8 (:func:`label_bytes`: a
byte of a file name that was not UTF-8 is written ``\\xNN``).

The per-sample error rule: ``error`` is empty for a sample that was answered. Otherwise it holds
the reason on one line of UTF-8, and that sample's top-k is blank (``labels`` ``b""``,
``probabilities`` 0.0, ``indices`` -1); the other samples of the batch and of the request are
answered as usual. On ``<name>_image`` a sample fails when its bytes are not a usable image (the
hardened loader's reason) or decoding or preprocessing raises anything else (its type and
message). The tensor model has the same ``error`` output, so one client reads both models; there a
sample fails only when its scores are not finite (:data:`NON_FINITE`: NaN or infinity in the
input, or an overflow), which both servers detect in :func:`answer`.

This module imports only the standard library and numpy: it is shipped verbatim into the exported
repository's Python-backend models (:mod:`.repository`), which answer with :func:`answer`, as
``serve`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IMAGE_SUFFIX = "_image"  # <name>_image: the model that takes encoded images
INPUT, IMAGE = "input", "image"
LABELS, PROBABILITIES, INDICES, ERROR = "labels", "probabilities", "indices", "error"
ABOVE_THRESHOLD = "above_threshold"  # multi-label models only
BLANK_LABEL, BLANK_PROBABILITY, BLANK_INDEX = b"", 0.0, -1
NON_FINITE = "the scores are not finite (NaN or infinity in the input, or an overflow)"
# Triton's datatype names (as clients and model metadata spell them) -> numpy dtypes.
NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64, "BYTES": np.object_, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, Triton datatype and per-sample dims."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """One public model: its name, inputs and outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Contract:
    """The contract of one classifier served as ``name``: crop size ``image_size``, top-``k`` of ``num_classes``;
    a multi-label one's per-label ``thresholds`` (None: single-label)."""

    name: str
    image_size: int
    num_classes: int
    k: int
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image size must be at least 1, got {self.image_size}")
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k must be in 1..{self.num_classes} (the top-k clamped to the classes), got {self.k}")
        if self.thresholds is not None and (len(self.thresholds) != self.num_classes or self.k != self.num_classes):
            raise ValueError(
                f"a multi-label contract answers every label: {self.num_classes} thresholds and "
                f"k = {self.num_classes}, got {len(self.thresholds)} thresholds and k = {self.k}"
            )

    @property
    def tensor_input(self) -> TensorSpec:
        return TensorSpec(INPUT, "FP32", (3, self.image_size, self.image_size))

    @property
    def image_input(self) -> TensorSpec:
        return TensorSpec(IMAGE, "BYTES", (1,))

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """What both models answer, per sample."""
        k = (self.k,)
        common = (
            TensorSpec(LABELS, "BYTES", k),
            TensorSpec(PROBABILITIES, "FP32", k),
            TensorSpec(INDICES, "INT64", k),
            TensorSpec(ERROR, "BYTES", (1,)),
        )
        return common if self.thresholds is None else (*common, TensorSpec(ABOVE_THRESHOLD, "BOOL", k))

    def output(self, name: str) -> TensorSpec:
        """The output called ``name``."""
        (spec,) = [spec for spec in self.outputs if spec.name == name]
        return spec

    @property
    def tensor_model(self) -> ModelSpec:
        return ModelSpec(self.name, (self.tensor_input,), self.outputs)

    @property
    def image_model(self) -> ModelSpec:
        return ModelSpec(self.name + IMAGE_SUFFIX, (self.image_input,), self.outputs)

    @property
    def models(self) -> tuple[ModelSpec, ModelSpec]:
        return self.tensor_model, self.image_model


def label_bytes(name: str) -> bytes:
    """A class name as ``labels`` carries it: valid UTF-8, whatever the name holds.

    A name read from a file system that was not UTF-8 holds surrogate escapes (``os.fsdecode``);
    each such byte is written ``\\xNN``, as the terminal shows it. Everything else, control
    characters included, is the name's own UTF-8.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").encode("utf-8")


def encode_labels(names: Sequence[str]) -> np.ndarray:
    """Class names as ``labels`` carries them (:func:`label_bytes`), in an object array indexed by class."""
    labels = np.empty(len(names), dtype=object)
    labels[:] = [label_bytes(name) for name in names]
    return labels


def error_bytes(reason: str) -> bytes:
    """``error``'s value for a reason: one line of UTF-8 (line breaks written as ``\\n``)."""
    return "\\n".join(reason.splitlines()).encode("utf-8", "backslashreplace")


def answer(
    probabilities: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
    errors: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The contract's outputs for a batch, by name.

    ``probabilities`` and ``indices`` are each sample's top-k ``(n, k)``, best first (any values
    for a failed sample); ``labels`` come from :func:`encode_labels`; ``errors`` has one reason per
    sample, empty for a sample that was answered (None: none failed). Samples with a reason, or
    with scores that are not finite, get a blank top-k (see the module's docstring). ``thresholds``
    (a multi-label model's, by label index) add ``above_threshold``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    if probabilities.ndim != 2 or indices.shape != probabilities.shape:
        raise ValueError(f"expected top-k arrays (n, k) of one shape, got {probabilities.shape} and {indices.shape}")
    reasons = [""] * len(probabilities) if errors is None else list(errors)
    if len(reasons) != len(probabilities):
        raise ValueError(f"{len(reasons)} error reasons for {len(probabilities)} samples")
    finite = np.isfinite(probabilities).all(axis=1)
    reasons = [reason or ("" if ok else NON_FINITE) for reason, ok in zip(reasons, finite)]
    failed = np.array([bool(reason) for reason in reasons], dtype=bool).reshape(-1, 1)
    indices = np.where(failed, np.int64(BLANK_INDEX), indices)
    named = labels[np.where(failed, 0, indices)]
    named[failed[:, 0]] = BLANK_LABEL
    error = np.empty((len(reasons), 1), dtype=object)
    error[:, 0] = [error_bytes(reason) for reason in reasons]
    outputs = {
        LABELS: named,
        PROBABILITIES: np.where(failed, np.float32(BLANK_PROBABILITY), probabilities),
        INDICES: indices,
        ERROR: error,
    }
    if thresholds is not None:
        limits = np.asarray(thresholds, dtype=np.float32)[np.where(failed, 0, indices)]
        outputs[ABOVE_THRESHOLD] = ~failed & (probabilities >= limits)
    return outputs
