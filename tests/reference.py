"""An independent reference for NVIDIA's two models: timm's ResNet configured the same way.

NVIDIA's SE block has a fixed hidden width of 16 (``SEBottleneck`` passes ``se_squeeze=16`` to
``SqueezeAndExcitation``, in NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/
image_classification/models/resnet.py), so timm's SEModule is given ``rd_channels=16``. NVIDIA checkpoint
keys are renamed to timm's from that code's names: ``layers.N`` stages (``ngc_checkpoint_remap`` there maps the
20.06.0 files' ``layerN``) and ``<block>.squeeze.squeeze`` / ``.squeeze.expand`` SE layers, ``nn.Linear``
(2-D) in image_classification/resnet.py, which wrote the 20.06.0 files, and 1x1 convolutions in models/common.py.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.layers import SEModule
from timm.models.resnet import Bottleneck
from timm.models.resnet import ResNet as TimmResNet


def timm_nvidia_model(architecture: str) -> torch.nn.Module:
    block_args = {"attn_layer": partial(SEModule, rd_channels=16)} if architecture.startswith("se_") else {}
    return TimmResNet(Bottleneck, [3, 4, 23, 3], cardinality=32, base_width=4, block_args=block_args).eval()


def nvidia_to_timm_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^module\.", "", key)
        key = re.sub(r"^layers\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        key = key.replace(".squeeze.squeeze.", ".se.fc1.").replace(".squeeze.expand.", ".se.fc2.")
        if ".se.fc" in key and key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def reference_from_ngc_file(path, architecture: str) -> torch.nn.Module:
    model = timm_nvidia_model(architecture)
    model.load_state_dict(nvidia_to_timm_keys(torch.load(path, weights_only=True)), strict=True)
    return model
