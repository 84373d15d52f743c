"""What an exported ONNX file says about itself (``metadata_props``): its classes and the input it expects.

Read them with ONNX Runtime: ``InferenceSession(path).get_modelmeta().custom_metadata_map``. Every value is a
string (ONNX's ``metadata_props`` holds strings); the keys:

- ``classes``: a JSON list of the class names, by output index (a fine-tuned checkpoint's own names);
- ``multi_label`` and ``thresholds``, for a multi-label model only (``finetune --multi-label``): ``true``, and a
  JSON list of its per-label thresholds, by output index; its ``probabilities`` output is then each logit's
  sigmoid, and a label is present at or above its threshold;
- ``preprocessing``: a JSON object, the weights' preset (``resize_size``, ``crop_size``, ``interpolation``,
  ``mean``, ``std``: resize the shorter side, center-crop, scale to [0, 1], normalize; see
  :class:`resnext_hub.processing.presets.ImageClassification`);
- ``image_size``: the input's height = width (the crop size unless exported with another ``--image-size``);
- ``architecture``: e.g. ``seresnext26d_32x4d``;
- ``weights``: the weights record's name (``weights_manifest.json``), absent for random weights and for
  fine-tuned checkpoints;
- ``model_license``: the weights' license where their record gives one (a key ONNX itself names: onnx/docs/IR.md,
  "Optional Metadata");
- ``precision``: ``fp32``, ``fp16`` (computed in half precision inside; inputs and outputs stay FP32) or ``int8``;
- ``opset``: the ONNX opset the file was written in.

``classes``, ``preprocessing``, ``architecture``, ``weights`` and ``model_license`` come from the model's
own record (:class:`resnext_hub.models.meta.ModelMeta`); a module that is not one of ours gets the others only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import nn

from ..models.meta import Described

KEYS = (
    "classes",
    "multi_label",
    "thresholds",
    "preprocessing",
    "image_size",
    "architecture",
    "weights",
    "model_license",
    "precision",
    "opset",
)


def onnx_metadata(model: nn.Module, *, image_size: int, precision: str, opset: int | None) -> dict[str, str]:
    """The ``metadata_props`` of ``model``'s ONNX file (keys in the module docstring), from its own record.

    ``opset=None`` leaves ``opset`` out: the OpenVINO IR records the other keys in its ``rt_info``
    (:mod:`resnext_hub.models.openvino_ir`)."""
    metadata: dict[str, str] = {}
    if isinstance(model, Described):
        meta = model.meta
        metadata["classes"] = json.dumps(list(meta.classes.names), ensure_ascii=False)
        if getattr(model, "thresholds", None) is not None:
            metadata.update(multi_label="true", thresholds=json.dumps(list(model.thresholds)))
        metadata["preprocessing"] = json.dumps(meta.preprocessing.as_dict())
    metadata["image_size"] = str(image_size)
    if isinstance(model, Described):
        if meta.architecture:
            metadata["architecture"] = meta.architecture
        if meta.weights is not None:
            metadata["weights"] = meta.weights.name
            if meta.weights.license:
                metadata["model_license"] = meta.weights.license
    metadata["precision"] = precision
    if opset is not None:
        metadata["opset"] = str(opset)
    return metadata


def set_metadata(model, metadata: Mapping[str, str]) -> None:
    """Write ``metadata`` into ``model``'s (an ``onnx.ModelProto``) ``metadata_props``: each of :data:`KEYS` is
    replaced (absent from ``metadata``: removed); entries under other keys stay."""
    kept = [(entry.key, entry.value) for entry in model.metadata_props if entry.key not in KEYS]
    model.ClearField("metadata_props")
    for key, value in [*kept, *metadata.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
