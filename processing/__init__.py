"""Image loading, preprocessing and label utilities (NVIDIA-compatible, hardened).

Imports nothing from ``models``: see that package's docstring.
"""

if __name__ != "resnext_hub.processing":
    # One import identity: a second copy of these modules would break isinstance checks.
    raise ImportError(f"import this folder as resnext_hub.processing, not as {__name__} (see README, Layout)")

from .images import BACKGROUND, InvalidImageError, load_image
from .labels import get_imgnet_classes, imagenet_labels, imagenet_wnids
from .predictions import Prediction, pick_n_best, top_k
from .transforms import NVIDIA, PreprocessingSpec, build_transform, resolve_spec
from .utils import ConvNetsProcessingUtils, nvidia_convnets_processing_utils, prepare_batch, prepare_input_from_uri

__all__ = [
    "BACKGROUND",
    "NVIDIA",
    "ConvNetsProcessingUtils",
    "InvalidImageError",
    "Prediction",
    "PreprocessingSpec",
    "build_transform",
    "get_imgnet_classes",
    "imagenet_labels",
    "imagenet_wnids",
    "load_image",
    "nvidia_convnets_processing_utils",
    "pick_n_best",
    "prepare_batch",
    "prepare_input_from_uri",
    "resolve_spec",
    "top_k",
]
