"""``export --format hf``: a folder that timm and Hugging Face load, verified by reading it back.

The folder holds ``config.json`` (timm's fields: :mod:`resnext_hub.models.hf_config`), ``model.safetensors``
(the state dict in timm's key layout, which is this project's) and ``README.md``, a model card (preprocessing,
published metrics, license, provenance). ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads it;
so do ``--checkpoint FOLDER`` and ``pretrained_from_file=FOLDER`` here, which is how it is verified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from ..models.builder import build_model
from ..models.hf_config import CONFIG_FILE, WEIGHTS_FILE, hf_config, timm_architecture
from ..models.resnet import ResNet
from .checks import (
    FP32_TOLERANCE,
    VERIFY_BATCHES,
    Check,
    ExportError,
    ExportResult,
    default_image_size,
    eager_copy,
    staged,
)
from .checks import verify as verify_logits

log = logging.getLogger(__name__)

CARD_FILE = "README.md"


def timm_config(model: ResNet) -> dict[str, Any]:
    """timm's config.json of ``model``; ``ExportError`` for what timm's format cannot hold."""
    if not isinstance(model, ResNet):
        raise ExportError(f"--format hf writes this project's ResNet models, not {type(model).__name__}")
    if not isinstance(model.fc, (nn.Linear, nn.Identity)):  # (Identity: no head, refused below with the others)
        raise ExportError(
            f"model.fc is {type(model.fc).__name__}: timm's format holds a Linear head; export the model as ONNX, "
            "TorchScript or pt2 instead"
        )
    try:
        architecture = timm_architecture(model.architecture)
    except ValueError as error:
        raise ExportError(str(error)) from None
    in_chans = model.get_submodule(model.first_conv).in_channels
    pool = model.global_pool.pool_type
    if not model.num_classes or in_chans != 3 or pool != "avg":
        raise ExportError(
            f"--format hf writes timm's default construction (a head, 3 input channels, average pooling); this model "
            f"has {model.num_classes} classes, {in_chans} input channels and global_pool {pool!r}: export it as "
            "ONNX, TorchScript or pt2 instead"
        )
    return hf_config(
        architecture, classes=model.classes, num_features=model.num_features, pretrained_cfg=model.pretrained_cfg
    )


def model_card(model: ResNet, config: dict[str, Any]) -> str:
    """The folder's ``README.md``: what the weights are, how to feed them, how they score, under which terms."""
    cfg = config["pretrained_cfg"]
    record = model.meta.record if model.meta.weights is not None else None
    license_id = cfg.get("license") if cfg.get("license", "").replace("-", "").replace(".", "").isalnum() else None
    preset = model.preprocessing
    lines = ["---", "library_name: timm", "tags:", "- image-classification", "- timm"]
    lines += [f"license: {license_id or 'other'}", "---", "", f"# {config['architecture']}", ""]
    if record is not None:
        lines += [f"Weights `{record.name}`, published by {record.publisher}. {record.provenance}", ""]
        lines += [f"License: {record.license or 'not stated'}.", ""]
    else:
        lines += [
            f"Weights of a `{config['architecture']}` that are not a published record (a fine-tuned or other local "
            "checkpoint, or random weights): their provenance, license and accuracy are their author's to state.",
            "",
        ]
    lines += [
        "Written by resnext-hub's `python -m resnext_hub export --format hf`: timm's `config.json`, the weights in "
        "timm's key layout (`model.safetensors`), this card.",
        "",
        "## Preprocessing",
        "",
        f"Resize the shorter side to {preset.resize_size} ({preset.interpolation}), center-crop "
        f"{preset.crop_size}x{preset.crop_size}, scale to [0, 1], normalize with mean {list(preset.mean)} and std "
        f"{list(preset.std)} (`crop_pct` {cfg['crop_pct']}).",
    ]
    if "test_input_size" in cfg:
        lines.append(f"timm's test size: {cfg['test_input_size'][-1]} (`test_crop_pct` {cfg['test_crop_pct']}).")
    lines += ["", "## Classes", ""]
    lines.append(f"{config['num_classes']} classes" + (" (ImageNet-1k)." if "label_descriptions" in config else "."))
    if record is not None:
        lines += ["", "## Published accuracy", "", "| metric | top-1 | top-5 | source |", "|---|---|---|---|"]
        for name, metric in record.metrics.items():
            top5 = "–" if metric.get("top5") is None else metric["top5"]
            lines.append(f"| {name} | {metric.get('top1')} | {top5} | {metric.get('source', '')} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "config = timm.data.resolve_model_data_config(model)  # the preprocessing above",
        "transform = timm.data.create_transform(**config)",
        "```",
        "",
    ]
    return "\n".join(lines)


def verify_hf(
    folder: str | Path, model: nn.Module, *, image_size: int, batches: Sequence[int] = VERIFY_BATCHES
) -> list[Check]:
    """Read ``folder`` back as this project's doors do (``pretrained_from_file``) and compare logits, class names
    and preprocessing with ``model``'s."""
    loaded = build_model(model.architecture, pretrained_from_file=folder)
    what = f"Hugging Face folder {Path(folder).name}"
    if loaded.classes.names != model.classes.names:
        raise ExportError(f"{what} reads back with other class names than the model's")
    if loaded.preprocessing != model.preprocessing:
        raise ExportError(f"{what} reads back with preprocessing {loaded.preprocessing}, not {model.preprocessing}")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return loaded(x).numpy()

    return verify_logits(run, eager_copy(model), image_size, FP32_TOLERANCE, batches, what)


def export_hf(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` as a folder in timm's Hugging Face format (config.json, model.safetensors, README.md),
    verified by reading it back. NVIDIA's SE-ResNeXt101-32x4d is refused (``ExportError`` saying why: timm's
    config cannot express its SE width). An existing folder is replaced only with ``overwrite``."""
    path = Path(path)
    config = timm_config(model)
    size = image_size or default_image_size(model)
    eager = eager_copy(model)
    tensors = {key: value.detach().contiguous() for key, value in eager.state_dict().items()}
    with staged(path, "Hugging Face export", overwrite=overwrite) as folder:
        folder.mkdir()  # staged as a folder: it replaces an existing one whole, once verified
        # Through open(): the file gets the mode open() gives under the umask (safetensors' own writer gives 0600).
        (folder / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / CARD_FILE).write_text(model_card(eager, config), encoding="utf-8")
        checks = verify_hf(folder, eager, image_size=size, batches=verify_batches)
    return ExportResult("hf", path, "fp32", size, checks)
