"""Checkpoint files with random weights in the publishers' real key layouts.

The renaming here is written from NVIDIA's own model code, independently of ``resnext_hub.models.checkpoint``:
it turns a state dict in timm's names (our model's) into NVIDIA's (DeepLearningExamples,
PyTorch/Classification/ConvNets: ``layerN`` stages and ``nn.Linear`` SE in image_classification/resnet.py,
which wrote the NGC 20.06.0 files; ``layers.N`` and 1x1-convolution SE in image_classification/models/).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch

from resnext_hub.models import VARIANTS, ResNet

NGC_FILES = {
    "resnext101_32x4d": "nvidia_resnext101-32x4d_200821.pth.tar",
    "se_resnext101_32x4d": "nvidia_se-resnext101-32x4d_200821.pth.tar",
}


def random_state_dict(architecture: str, seed: int = 0, num_classes: int = 1000) -> OrderedDict:
    """Weights of a plausible trained net: random convs, BN statistics away from identity,
    and small last-BN gains so activations stay bounded through 101 layers."""
    torch.manual_seed(seed)
    model = ResNet(VARIANTS[architecture], num_classes)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.uniform_(-0.1, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("num_batches_tracked"):
            value.fill_(1000)
        elif ".bn3.weight" in key:
            value.uniform_(0.0, 0.3)
        elif ("bn" in key or "downsample" in key) and value.dim() == 1:
            value.uniform_(0.5, 1.5) if key.endswith("weight") else value.uniform_(-0.1, 0.1)
        elif ".se.fc" in key and key.endswith("bias"):
            value.uniform_(-0.2, 0.2)
    return OrderedDict(state)


def to_nvidia_layout(state: dict, *, stages: str = "layerN", se_dims: int = 2, prefix: str = "") -> OrderedDict:
    """NVIDIA names: ``<block>.squeeze.squeeze/expand`` SE (2-D or 4-D), ``layerN`` or ``layers.N``."""
    out = OrderedDict()
    for key, value in state.items():
        key = key.replace(".se.fc1.", ".squeeze.squeeze.").replace(".se.fc2.", ".squeeze.expand.")
        if ".squeeze." in key and key.endswith("weight") and se_dims == 2:
            value = value.flatten(1)
        if stages == "layers.N":
            key = re.sub(r"^layer(\d)\.", lambda m: f"layers.{int(m.group(1)) - 1}.", key)
        out[prefix + key] = value.clone()
    return out


def write_ngc_file(folder: Path, architecture: str, seed: int = 0) -> Path:
    """The NGC 20.06.0 file: a plain state dict, ``layerN`` names, 2-D SE weights."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NGC_FILES[architecture]
    torch.save(to_nvidia_layout(random_state_dict(architecture, seed)), path)
    return path
