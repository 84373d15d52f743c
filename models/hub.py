"""torch.hub entry points, registered in :mod:`.registry` (``hubconf.py`` exports what is registered).

Every entry takes :func:`~.builder.build_model`'s keywords, timm's model options included.
"""

from __future__ import annotations

from typing import Any

from ..processing.utils import nvidia_convnets_processing_utils
from .builder import build_model
from .registry import register_entry, register_model
from .resnet import ResNet

register_entry(nvidia_convnets_processing_utils)


@register_model("resnext101_32x4d")
def nvidia_resnext101_32x4d(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt101-32x4d (44,177,704 parameters), NVIDIA's ImageNet weights (top-1 79.47%); same as ``nvidia_resneXt``.

    Keyword-only: pretrained (bool, default True), pretrained_from_file (str), a local checkpoint in any NVIDIA
    or timm layout (no pretrained=False needed), weights (str, default "ngc_20.06"), num_classes (int),
    state_dict_key_map_fn, channels_last, fused_se, progress, and timm's in_chans, global_pool, drop_rate,
    drop_path_rate (num_classes=0: no head). ``build_model`` documents each.
    """
    return build_model("resnext101_32x4d", pretrained=pretrained, **kwargs)


@register_model("resnext101_32x4d", alias_of="nvidia_resnext101_32x4d")
def nvidia_resneXt(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt101-32x4d under NVIDIA's entry-point name (44,177,704 parameters, top-1 79.47%).

    Example::

        model = torch.hub.load("<org>/resnext-hub", "nvidia_resneXt", trust_repo=True)

    Keyword-only: pretrained (bool, default True), pretrained_from_file (str), a local checkpoint (no
    pretrained=False needed), weights (str, default "ngc_20.06"), num_classes (int), state_dict_key_map_fn,
    channels_last, fused_se, progress, and timm's in_chans, global_pool, drop_rate, drop_path_rate
    (num_classes=0: no head). ``build_model`` documents each. Returns the model in eval mode.
    """
    return build_model("resnext101_32x4d", pretrained=pretrained, **kwargs)


@register_model("se_resnext101_32x4d")
def nvidia_se_resnext101_32x4d(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """SE-ResNeXt101-32x4d (45,251,128 parameters), NVIDIA's ImageNet weights (top-1 80.03%).

    Example::

        model = torch.hub.load("<org>/resnext-hub", "nvidia_se_resnext101_32x4d", trust_repo=True)
        utils = torch.hub.load("<org>/resnext-hub", "nvidia_convnets_processing_utils", trust_repo=True)
        batch = utils.prepare_input_from_uri("cat.jpg")
        utils.pick_n_best(torch.softmax(model(batch), 1), n=5)

    Keyword-only: pretrained (bool), pretrained_from_file (str), weights (default "ngc_20.06"), num_classes,
    state_dict_key_map_fn, channels_last, fused_se, progress,
    and timm's in_chans, global_pool, drop_rate, drop_path_rate (num_classes=0: no head); see ``build_model``.
    """
    return build_model("se_resnext101_32x4d", pretrained=pretrained, **kwargs)


@register_model("seresnext26d_32x4d")
def seresnext26d_32x4d(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt26d-32x4d (deep stem, avg-pool shortcuts; 16,809,512 parameters, top-1 77.59%).

    Its weights expect timm's preprocessing (bicubic): pass the model to the utilities
    (``preprocessing=model``). Keyword-only: pretrained (bool), pretrained_from_file (str), weights (default
    "bt_in1k", or timm's id "hf-hub:timm/seresnext26d_32x4d.bt_in1k"), num_classes, state_dict_key_map_fn,
    channels_last, fused_se, progress,
    and timm's in_chans, global_pool, drop_rate, drop_path_rate (num_classes=0: no head); see ``build_model``.
    """
    return build_model("seresnext26d_32x4d", pretrained=pretrained, **kwargs)


@register_model("seresnext26t_32x4d")
def seresnext26t_32x4d(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt26t-32x4d (tiered deep stem, avg-pool shortcuts; 16,806,976 parameters, top-1 77.98%).

    Keyword-only: pretrained (bool), pretrained_from_file (str), weights (default "bt_in1k", or timm's id
    "hf-hub:timm/seresnext26t_32x4d.bt_in1k"), num_classes,
    state_dict_key_map_fn, channels_last, fused_se, progress,
    and timm's in_chans, global_pool, drop_rate, drop_path_rate (num_classes=0: no head); see ``build_model``.
    """
    return build_model("seresnext26t_32x4d", pretrained=pretrained, **kwargs)


@register_model("seresnext50_32x4d")
def seresnext50_32x4d(*, pretrained: bool = True, **kwargs: Any) -> ResNet:
    """timm's SE-ResNeXt50-32x4d (27,559,896 parameters, top-1 81.27%).

    Keyword-only: pretrained (bool), pretrained_from_file (str), weights (default "racm_in1k", or timm's id
    "hf-hub:timm/seresnext50_32x4d.racm_in1k"), num_classes,
    state_dict_key_map_fn, channels_last, fused_se, progress,
    and timm's in_chans, global_pool, drop_rate, drop_path_rate (num_classes=0: no head); see ``build_model``.
    """
    return build_model("seresnext50_32x4d", pretrained=pretrained, **kwargs)
