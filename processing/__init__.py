"""Inputs and outputs of the models: the hardened image loader, presets, class lists, NVIDIA's utilities.

Imports nothing from ``resnext_hub.models`` (that package builds on this one).
"""

if __name__ != "resnext_hub.processing":
    # One import identity: a second copy of these modules would break isinstance checks.
    raise ImportError(f"import this folder as resnext_hub.processing, not as {__name__} (see README, Layout)")

from .images import BACKGROUND, InvalidImageError, load_image
from .labels import ClassList, class_list, get_imgnet_classes, imagenet_classes, imagenet_labels, imagenet_wnids
from .predictions import Prediction, pick_n_best, top_k
from .presets import ImageClassification, as_preset
from .utils import ConvNetsProcessingUtils, nvidia_convnets_processing_utils, prepare_batch, prepare_input_from_uri

__all__ = [
    "BACKGROUND",
    "ClassList",
    "ConvNetsProcessingUtils",
    "ImageClassification",
    "InvalidImageError",
    "Prediction",
    "as_preset",
    "class_list",
    "get_imgnet_classes",
    "imagenet_classes",
    "imagenet_labels",
    "imagenet_wnids",
    "load_image",
    "nvidia_convnets_processing_utils",
    "pick_n_best",
    "prepare_batch",
    "prepare_input_from_uri",
    "top_k",
]
