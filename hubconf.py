"""torch.hub entry points of resnext-hub: NVIDIA's ResNeXt/SE-ResNeXt API and timm's SE-ResNeXt family.

model = torch.hub.load("<org>/resnext-hub", "nvidia_se_resnext101_32x4d", trust_repo=True)
"""

dependencies = ["torch", "torchvision", "PIL", "numpy", "requests"]

from resnext_hub.models import (  # noqa: E402
    nvidia_resneXt,
    nvidia_resnext101_32x4d,
    nvidia_se_resnext101_32x4d,
    seresnext26d_32x4d,
    seresnext26t_32x4d,
    seresnext50_32x4d,
)
from resnext_hub.processing import nvidia_convnets_processing_utils  # noqa: E402

__all__ = [
    "nvidia_convnets_processing_utils",
    "nvidia_resneXt",
    "nvidia_resnext101_32x4d",
    "nvidia_se_resnext101_32x4d",
    "seresnext26d_32x4d",
    "seresnext26t_32x4d",
    "seresnext50_32x4d",
]
