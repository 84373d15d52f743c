"""ResNeXt / SE-ResNeXt models, their weights manifest, the one weights loader and the entry-point registry.

Builds on ``resnext_hub.processing`` (presets, class lists, the HTTP fetch), never the reverse.
"""

if __name__ != "resnext_hub.models":
    # One import identity: a second copy of these modules would break isinstance checks.
    raise ImportError(f"import this folder as resnext_hub.models, not as {__name__} (see README, Layout)")

from .builder import build_model
from .checkpoint import CheckpointError, read_checkpoint
from .download import MIRROR_ENV, WeightsUnavailableError
from .head import HeadError
from .hub import (
    nvidia_resneXt,
    nvidia_resnext101_32x4d,
    nvidia_se_resnext101_32x4d,
    seresnext26d_32x4d,
    seresnext26t_32x4d,
    seresnext50_32x4d,
)
from .meta import ModelMeta
from .registry import get_entry, hub_entries, list_models, register_model
from .resnet import ResNet, ResNetConfig
from .variants import VARIANTS
from .weights import Weights, get_weights, load_manifest

__all__ = [
    "MIRROR_ENV",
    "VARIANTS",
    "CheckpointError",
    "HeadError",
    "ModelMeta",
    "ResNet",
    "ResNetConfig",
    "Weights",
    "WeightsUnavailableError",
    "build_model",
    "get_entry",
    "get_weights",
    "hub_entries",
    "list_models",
    "load_manifest",
    "nvidia_resneXt",
    "nvidia_resnext101_32x4d",
    "nvidia_se_resnext101_32x4d",
    "read_checkpoint",
    "register_model",
    "seresnext26d_32x4d",
    "seresnext26t_32x4d",
    "seresnext50_32x4d",
]
