"""torch.hub entry points of resnext-hub: NVIDIA's ResNeXt/SE-ResNeXt API and timm's SE-ResNeXt family.

model = torch.hub.load("<org>/resnext-hub", "nvidia_se_resnext101_32x4d", trust_repo=True)
"""

dependencies = ["torch", "torchvision", "PIL", "numpy", "urllib3", "certifi", "validators"]

# The entry points are registered once, beside their code (resnext_hub/models/hub.py): hubconf
# exports exactly what the registry holds, which is also what the CLI, web demo and model table list.
from resnext_hub.models import hub_entries as _hub_entries  # noqa: E402

globals().update(_hub_entries())
__all__ = sorted(_hub_entries())
