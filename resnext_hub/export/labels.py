"""What an exported file says about its outputs: the class names, and whether the head is multi-label.

TorchScript files carry it as the extra file :data:`TORCHSCRIPT_FILE`, the JSON of :func:`labels_record`;
pt2 packages as the same file in the archive's ``extra/`` folder (:func:`add_to_pt2`: read it with
``zipfile``, or ``torch.export.pt2_archive``'s reader); ONNX files as ``metadata_props``
(:mod:`.onnx_metadata`)::

    {"classes": ["circle", "square", "triangle"], "multi_label": true, "thresholds": [0.41, 0.52, 0.38]}

A multi-label model's ``probabilities`` output (ONNX, and the Triton models built on it) is the sigmoid
of each logit, not the softmax over them (:func:`output_probabilities`); a label is present when its
probability is at or above its threshold.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import torch
from torch import nn

TORCHSCRIPT_FILE = "labels.json"


def is_multi_label(model: nn.Module) -> bool:
    """Whether ``model`` has a multi-label head (False for a module without a model's metadata)."""
    return bool(getattr(model, "multi_label", False))


def labels_record(model: nn.Module) -> dict[str, Any] | None:
    """The model's class names and, multi-label, its thresholds; None for a module without class names."""
    try:
        classes = model.classes
    except (AttributeError, ValueError):  # not one of the models here, or a head without classes (HeadError)
        return None
    record: dict[str, Any] = {"classes": list(classes.names), "multi_label": is_multi_label(model)}
    if record["multi_label"]:
        record["thresholds"] = list(model.thresholds)
    return record


def labels_json(model: nn.Module) -> str | None:
    """:func:`labels_record` as JSON text (non-ASCII names as they are), or None."""
    record = labels_record(model)
    return None if record is None else json.dumps(record, ensure_ascii=False)


def output_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """The ``probabilities`` output: softmax over the classes, or a multi-label head's sigmoid per label."""
    return logits.sigmoid() if multi_label else logits.softmax(1)


def add_to_pt2(package: io.BytesIO, model: nn.Module) -> str | None:
    """Add :func:`labels_json` to an in-memory pt2 ``package`` (a zip archive) as ``<archive>/extra/labels.json``,
    where torch's PT2 archive keeps extra files; returns the member's name (None: the model has no class names)."""
    labels = labels_json(model)
    if labels is None:
        return None
    with zipfile.ZipFile(package, "a") as archive:
        folder = archive.namelist()[0].split("/", 1)[0]  # every member sits in the archive's one folder
        name = f"{folder}/extra/{TORCHSCRIPT_FILE}"
        archive.writestr(name, labels)
    return name
