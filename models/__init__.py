"""ResNeXt / SE-ResNeXt models, their weights manifest and the one weights loader.

This package imports nothing from ``processing`` (and vice versa): torch.hub imports both
under the private ``resnext_hub`` prefix, where cross-imports by top-level name would pick
up another hub repo's packages.
"""

if __name__ != "resnext_hub.models":
    # One import identity: a second copy of these modules would break isinstance checks.
    raise ImportError(f"import this folder as resnext_hub.models, not as {__name__} (see README, Layout)")

from .builder import build_model
from .checkpoint import CheckpointError, read_checkpoint
from .download import MIRROR_ENV, WeightsUnavailableError
from .hub import (
    nvidia_resneXt,
    nvidia_resnext101_32x4d,
    nvidia_se_resnext101_32x4d,
    seresnext26d_32x4d,
    seresnext26t_32x4d,
    seresnext50_32x4d,
)
from .resnet import ResNet, ResNetConfig
from .variants import VARIANTS
from .weights import Preprocessing, Weights, get_weights, load_manifest

__all__ = [
    "MIRROR_ENV",
    "VARIANTS",
    "CheckpointError",
    "Preprocessing",
    "ResNet",
    "ResNetConfig",
    "Weights",
    "WeightsUnavailableError",
    "build_model",
    "get_weights",
    "load_manifest",
    "nvidia_resneXt",
    "nvidia_resnext101_32x4d",
    "nvidia_se_resnext101_32x4d",
    "read_checkpoint",
    "seresnext26d_32x4d",
    "seresnext26t_32x4d",
    "seresnext50_32x4d",
]
