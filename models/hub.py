"""torch.hub entry points for the models (``hubconf.py`` re-exports these)."""

from __future__ import annotations

from typing import Any

from .builder import build_model
from .resnet import ResNet

_KWARGS_DOC = """
    Keyword arguments (all optional):
        pretrained (bool): load the published weights (default True).
        pretrained_from_file (str): load this local checkpoint instead (any NVIDIA or timm
            layout, .pth/.pth.tar/.safetensors); no need to also pass pretrained=False.
        weights (str): a manifest tag or name, e.g. {tag!r} (default).
        num_classes (int): 1000, or N for a fresh N-class head on the pretrained backbone.
        state_dict_key_map_fn (callable): renames each checkpoint key before loading.
        channels_last (bool): return the model in channels-last memory format.
        fused_se (bool): NVIDIA's option; both settings compute the same function.
        progress (bool): show a progress bar while downloading (default True).

    Returns the model in eval mode. ``model.preprocessing`` describes its input transform.
"""


def _entry(architecture: str, pretrained: bool, kwargs: dict[str, Any]) -> ResNet:
    return build_model(architecture, pretrained=pretrained, **kwargs)


def nvidia_resneXt(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt101-32x4d (44,177,704 parameters), NVIDIA's ImageNet weights (top-1 79.47%).

    Example::

        model = torch.hub.load("<org>/resnext-hub", "nvidia_resneXt", trust_repo=True)
    """
    return _entry("resnext101_32x4d", pretrained, kwargs)


def nvidia_resnext101_32x4d(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt101-32x4d: the same model as ``nvidia_resneXt``, under its architecture's name."""
    return _entry("resnext101_32x4d", pretrained, kwargs)


def nvidia_se_resnext101_32x4d(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """SE-ResNeXt101-32x4d (45,251,128 parameters), NVIDIA's ImageNet weights (top-1 80.03%).

    Example::

        model = torch.hub.load("<org>/resnext-hub", "nvidia_se_resnext101_32x4d", trust_repo=True)
        utils = torch.hub.load("<org>/resnext-hub", "nvidia_convnets_processing_utils", trust_repo=True)
        batch = utils.prepare_input_from_uri("cat.jpg")
        utils.pick_n_best(torch.softmax(model(batch), 1), n=5)
    """
    return _entry("se_resnext101_32x4d", pretrained, kwargs)


def seresnext26d_32x4d(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt26d-32x4d (deep stem, avg-pool shortcuts; 16,809,512 parameters, top-1 77.59%)."""
    return _entry("seresnext26d_32x4d", pretrained, kwargs)


def seresnext26t_32x4d(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt26t-32x4d (tiered deep stem, avg-pool shortcuts; 16,806,976 parameters, top-1 77.98%)."""
    return _entry("seresnext26t_32x4d", pretrained, kwargs)


def seresnext50_32x4d(pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt50-32x4d (27,559,896 parameters, top-1 81.27%)."""
    return _entry("seresnext50_32x4d", pretrained, kwargs)


for _fn, _tag in (
    (nvidia_resneXt, "ngc_20.06"),
    (nvidia_resnext101_32x4d, "ngc_20.06"),
    (nvidia_se_resnext101_32x4d, "ngc_20.06"),
    (seresnext26d_32x4d, "bt_in1k"),
    (seresnext26t_32x4d, "bt_in1k"),
    (seresnext50_32x4d, "racm_in1k"),
):
    _fn.__doc__ = (_fn.__doc__ or "") + _KWARGS_DOC.format(tag=_tag)
