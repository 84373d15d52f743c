"""The table of served architectures: each is a :class:`ResNetConfig` of the one ResNet class."""

from __future__ import annotations

from .resnet import ResNetConfig

NVIDIA_STAGES = (3, 4, 23, 3)

VARIANTS: dict[str, ResNetConfig] = {
    # NVIDIA DeepLearningExamples: 7x7 stem, strided 1x1 shortcuts, SE hidden width fixed at 16.
    "resnext101_32x4d": ResNetConfig(layers=NVIDIA_STAGES),
    "se_resnext101_32x4d": ResNetConfig(layers=NVIDIA_STAGES, se_hidden=16),
    # timm's model page: deep/tiered stems, avg-pool shortcuts, SE width channels/16.
    "seresnext26d_32x4d": ResNetConfig(layers=(2, 2, 2, 2), stem="deep", avg_down=True, se_reduction=16),
    "seresnext26t_32x4d": ResNetConfig(layers=(2, 2, 2, 2), stem="tiered", avg_down=True, se_reduction=16),
    "seresnext50_32x4d": ResNetConfig(layers=(3, 4, 6, 3), se_reduction=16),
}


def get_config(architecture: str) -> ResNetConfig:
    try:
        return VARIANTS[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(VARIANTS)}") from None
