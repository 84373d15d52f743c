"""The one builder: construct a variant, then load and adapt its weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import load_weights, read_checkpoint
from .download import fetch_checkpoint
from .resnet import ResNet
from .variants import get_config
from .weights import Weights, get_weights

log = logging.getLogger(__name__)


def build_model(
    architecture: str,
    *,
    pretrained: bool = True,
    pretrained_from_file: str | Path | None = None,
    weights: str | Weights | None = None,
    num_classes: int = 1000,
    state_dict_key_map_fn: Callable[[str], str] | None = None,
    channels_last: bool = False,
    fused_se: bool = True,
    progress: bool = True,
) -> ResNet:
    """Build ``architecture`` and load weights into it; returns the model in eval mode.

    ``pretrained_from_file`` wins over ``pretrained``; ``pretrained=False`` without a file
    gives random weights. The manifest record (``weights``, default: the architecture's
    default) supplies the download sources and, as ``model.preprocessing``, the input
    transform. With ``num_classes`` other than the checkpoint's, the backbone is loaded and
    the head is fresh.
    """
    config = get_config(architecture)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    record = get_weights(architecture, weights)
    loaded: Weights | None = None
    if pretrained_from_file is not None or pretrained:
        if pretrained_from_file is not None:
            path, where = Path(pretrained_from_file).expanduser(), str(pretrained_from_file)
        else:
            path, _ = fetch_checkpoint(record.sources, progress=progress)
            where, loaded = f"{record.name} ({path})", record
        state_dict = read_checkpoint(path)
        # Built on the meta device: the checkpoint's tensors are assigned, never initialised twice.
        with torch.device("meta"):
            model = ResNet(config, num_classes, fused_se=fused_se)
        load_weights(model, state_dict, key_map_fn=state_dict_key_map_fn, source=where)
        if model.fc.weight.is_meta:
            model.reset_classifier(num_classes)
    else:
        model = ResNet(config, num_classes, fused_se=fused_se)
    model.architecture = architecture
    model.weights_record = loaded
    model.preprocessing = record.preprocessing
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
