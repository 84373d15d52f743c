"""timm's Hugging Face folder format: ``config.json`` (written and read here) beside ``model.safetensors``.

The fields are those of timm's ``save_config_for_hf`` (timm/models/_hub.py, timm 1.0): ``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``label_names`` (``label_descriptions`` for ImageNet, whose
``label_names`` are WordNet ids as in timm's ``ImageNetInfo``) and ``pretrained_cfg`` (the weights' preprocessing,
:mod:`.pretrained_cfg`). Only timm's default construction is written and read (3 input channels, average pooling,
a Linear head): a config with ``model_args`` (other constructor keywords) is refused, never read as another model.
timm loads such a folder with ``timm.create_model("local-dir:FOLDER", pretrained=True)``; this project with
``pretrained_from_file=FOLDER``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..processing.labels import ClassList, imagenet_classes
from ..processing.presets import ImageClassification

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 16 << 20
# Our architectures that are timm's model of the same name: the same function for the same state dict
# (timm/models/resnet.py: resnext101_32x4d, seresnext26d_32x4d, seresnext26t_32x4d, seresnext50_32x4d).
TIMM_ARCHITECTURES = ("resnext101_32x4d", "seresnext26d_32x4d", "seresnext26t_32x4d", "seresnext50_32x4d")
# What timm's config cannot express, and what to use instead.
NOT_IN_TIMM = {
    "se_resnext101_32x4d": (
        "NVIDIA's SE-ResNeXt101-32x4d has SE blocks of a fixed 16 hidden channels in every stage (SEBottleneck passes "
        "se_squeeze=16, NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/image_classification/models/"
        "resnet.py), while timm's "
        "ResNet derives the SE width from each stage's channels (channels/16: 16, 32, 64, 128), and its config.json "
        "has no field for a fixed width: timm's seresnext101_32x4d would be another network, not these weights. "
        "Export it as ONNX, TorchScript or pt2 (--format onnx|torchscript|pt2), or load the checkpoint with "
        "torch.hub (pretrained_from_file=); NVIDIA's ResNeXt101-32x4d (no SE) exports as timm's resnext101_32x4d"
    )
}
SOURCE_KEYS = ("url", "hf_hub_id", "file", "source")  # where the original weights came from: not this folder


def timm_architecture(architecture: str | None) -> str:
    """timm's model name for ``architecture``; ``ValueError`` saying why when timm has none that computes it."""
    if architecture in TIMM_ARCHITECTURES:
        return architecture
    if architecture in NOT_IN_TIMM:
        raise ValueError(f"{architecture} cannot be written in timm's Hugging Face format: {NOT_IN_TIMM[architecture]}")
    raise ValueError(f"{architecture!r} has no timm model of the same function; expected one of {TIMM_ARCHITECTURES}")


def hf_config(
    architecture: str | None,
    *,
    classes: ClassList,
    num_features: int,
    pretrained_cfg: dict[str, Any],
) -> dict[str, Any]:
    """timm's ``config.json`` for a model of timm's default construction with a head for ``classes``."""
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in SOURCE_KEYS and k != "architecture"}
    cfg["num_classes"] = len(classes)
    cfg["custom_load"] = False
    config: dict[str, Any] = {
        "architecture": timm_architecture(architecture),
        "num_classes": len(classes),
        "num_features": num_features,
        "global_pool": "avg",
    }
    if classes.wnids is not None:
        config["label_names"] = list(classes.wnids)
        config["label_descriptions"] = dict(zip(classes.wnids, classes.names, strict=True))
    else:
        config["label_names"] = list(classes.names)
    config["pretrained_cfg"] = cfg
    return config


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (timm's Hugging Face format)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(folder: str | Path) -> tuple[str, ClassList, ImageClassification]:
    """(architecture, class names, preset) of a folder in timm's format; ``ValueError`` saying what is wrong."""
    path = Path(folder) / CONFIG_FILE
    try:
        with open(path, "rb") as handle:
            config = json.loads(handle.read(MAX_CONFIG_BYTES + 1))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not a readable JSON file: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("pretrained_cfg"), dict):
        raise ValueError(f"{path}: expected timm's config (an object with architecture and pretrained_cfg)")
    architecture = config.get("architecture")
    if config.get("model_args"):
        raise ValueError(
            f"{path} asks timm for model_args {config['model_args']}: only timm's default construction of "
            f"{architecture} is read here"
        )
    if architecture not in TIMM_ARCHITECTURES:
        raise ValueError(f"{path} is for timm's {architecture!r}; this project serves {TIMM_ARCHITECTURES}")
    cfg = config["pretrained_cfg"]
    try:
        return architecture, _classes(config, cfg), preset_of(cfg)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def _classes(config: dict[str, Any], cfg: dict[str, Any]) -> ClassList:
    count = config.get("num_classes", cfg.get("num_classes"))
    names = config.get("label_names", cfg.get("label_names"))
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"num_classes must be a positive int (a model with a head), got {count!r}")
    if names is None:
        return imagenet_classes() if count == 1000 else ClassList.of(str(i) for i in range(count))
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise ValueError(f"label_names must be a list of {count} names (num_classes), got {str(names)[:80]}")
    imagenet = imagenet_classes()
    if count == 1000 and tuple(names) == imagenet.wnids:
        return imagenet
    return ClassList.of(names)


def preset_of(cfg: dict[str, Any]) -> ImageClassification:
    """The preset that timm's eval transform of ``pretrained_cfg`` is: resize ``floor(size / crop_pct)``, then crop."""
    size = cfg["input_size"][-1]
    if cfg.get("crop_mode", "center") != "center":
        raise ValueError(f"crop_mode {cfg['crop_mode']!r}: only timm's 'center' crop is served")
    resize = math.floor(size / cfg.get("crop_pct", 0.875))
    return ImageClassification(resize, size, cfg.get("interpolation", "bicubic"), cfg["mean"], cfg["std"])
