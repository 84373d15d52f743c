"""Fine-tuned checkpoints: the weights plus what the model needs to be rebuilt (architecture, class names,
preset, a multi-label head's thresholds), written by ``finetune`` and read back by every door; also
``export --format hf``'s folders, read as the same record."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..processing.labels import ClassList
from ..processing.presets import ImageClassification
from .checkpoint import CheckpointError
from .hf_config import is_hf_folder, read_hf_config

FINETUNED_FORMAT = "resnext_hub.finetuned/1"


@dataclass(frozen=True)
class FinetunedMeta:
    """What a fine-tuned checkpoint says about its model: architecture, class names and preset; a multi-label
    head's per-class thresholds (None: single-label)."""

    architecture: str
    classes: ClassList
    preprocessing: ImageClassification
    thresholds: tuple[float, ...] | None = None


def finetuned_checkpoint(
    state_dict: Mapping[str, Tensor],
    *,
    architecture: str,
    classes: ClassList,
    preprocessing: ImageClassification,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The content of a fine-tuned checkpoint file: the weights and, as plain values, its metadata.

    Plain values (a list of str, a dict of numbers) load under ``weights_only=True``. A multi-label head
    (``thresholds``: one per class, on its sigmoid probabilities) adds ``"multi_label": True`` and
    ``"thresholds"``; a file without them is single-label (softmax), as every file written before.
    """
    content = {
        "format": FINETUNED_FORMAT,
        "architecture": architecture,
        "classes": list(classes.names),
        "preprocessing": preprocessing.as_dict(),
        "state_dict": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()},
    }
    if thresholds is not None:
        content.update(multi_label=True, thresholds=[float(t) for t in thresholds])
    return content


def _thresholds(data: Mapping[str, Any], count: int) -> tuple[float, ...] | None:
    """A fine-tuned file's multi-label thresholds (``ValueError`` for ones that contradict the file), or None."""
    if not data.get("multi_label", False):
        if "thresholds" in data:
            raise ValueError("thresholds are given, but multi_label is not true")
        return None
    if data["multi_label"] is not True:
        raise ValueError(f"multi_label must be true or false, got {data['multi_label']!r}")
    thresholds = data.get("thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != count:
        raise ValueError(f"a multi-label file needs {count} thresholds (one per class), got {thresholds!r:.80}")
    if not all(isinstance(t, float) and 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError("thresholds must be probabilities between 0 and 1")
    return tuple(thresholds)


_MAX_PICKLE_SCAN = 1 << 26  # bytes: a fine-tuned checkpoint's pickle is a few hundred KB


def _names_finetuned_format(path: Path) -> bool:
    """False when ``path`` cannot be a fine-tuned checkpoint: a torch zip whose pickle never names the format.

    Reads the zip's directory and its ``data.pkl`` record only (the format string is stored in it as
    is), which spares every other checkpoint a second unpickling of all its records (a tenth of a
    second for a 101-layer network). Anything it cannot tell is left to :func:`read_finetuned_meta`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            folder = records[0].filename.split("/", 1)[0] if records else ""
            record = archive.getinfo(f"{folder}/data.pkl")
            if record.file_size > _MAX_PICKLE_SCAN:
                return True
            with archive.open(record) as pickled:
                return FINETUNED_FORMAT.encode() in pickled.read()
    except Exception:  # not a zip, or not torch's layout: torch.load decides, as before
        return True


def read_finetuned_meta(path: str | Path) -> FinetunedMeta | None:
    """The metadata of a fine-tuned checkpoint (see :func:`finetuned_checkpoint`) or of a folder in timm's Hugging
    Face format (its ``config.json``: :mod:`.hf_config`); None for any other file.

    Only a torch zip file can be one: it is opened with ``weights_only=True`` and ``mmap=True``, so
    the tensors are not read. Files that cannot be opened so are left to :func:`read_checkpoint`.
    """
    path = Path(path)
    if is_hf_folder(path):
        try:
            return FinetunedMeta(*read_hf_config(path))
        except ValueError as error:
            raise CheckpointError(str(error)) from error
    if path.suffix == ".safetensors" or not path.is_file() or not _names_finetuned_format(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip file, or refused: read_checkpoint says why
        return None
    if not isinstance(data, Mapping) or data.get("format") != FINETUNED_FORMAT:
        return None
    try:
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise ValueError(f"classes must be a list of names, got {type(classes).__name__}")
        if not isinstance(data["architecture"], str):
            raise ValueError("architecture must be a name")
        meta = FinetunedMeta(
            data["architecture"],
            ClassList.of(classes),
            ImageClassification.from_dict(data["preprocessing"]),
            _thresholds(data, len(classes)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed fine-tuned checkpoint metadata ({error})") from error
    head = _head_rows(data.get("state_dict"))
    if head != len(classes):
        found = "no head (fc.weight, fc.bias)" if head is None else f"a head for {head} classes (fc)"
        raise CheckpointError(
            f"{path} names {len(classes)} classes but holds {found}: the file contradicts itself (damaged or "
            "edited); it is not used. Fine-tune again, or use the run's other checkpoint (best.pth / last.pth)"
        )
    return meta


def _head_rows(state_dict: object) -> int | None:
    """The number of classes of a state dict's ``fc`` head (weight and bias agreeing), or None."""
    if not isinstance(state_dict, Mapping):
        return None
    weight, bias = state_dict.get("fc.weight"), state_dict.get("fc.bias")
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor) or weight.dim() != 2 or bias.dim() != 1:
        return None
    return weight.shape[0] if bias.shape[0] == weight.shape[0] else None
