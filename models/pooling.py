"""Global pooling before the head, with timm's pool types (``SelectAdaptivePool2d``'s meanings)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# timm's names: "" keeps the unpooled maps (only without a classifier).
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


def check_pool_type(pool_type: object) -> str:
    """``pool_type`` if it is one of :data:`POOL_TYPES`, else a ``ValueError`` naming them."""
    if not isinstance(pool_type, str) or pool_type not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES} (timm's pool types), got {pool_type!r}")
    return pool_type


class GlobalPool(nn.Module):
    """``(N, C, H, W)`` to ``(N, C)``: ``"avg"`` (mean), ``"max"``, ``"avgmax"`` (their mean),
    ``"catavgmax"`` (both, concatenated: ``(N, 2C)``); ``""``: the maps unchanged."""

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        self.pool_type = check_pool_type(pool_type)

    def feat_mult(self) -> int:
        """Pooled features per channel (2 for ``"catavgmax"``), as timm's."""
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.pool_type:
            return x
        if self.pool_type == "avg":
            # mean + flatten, the ops the exported graphs have always had (ReduceMean, Flatten)
            return torch.flatten(x.mean((2, 3), keepdim=True), 1)
        if self.pool_type == "max":
            return x.amax((2, 3))
        mean, peak = x.mean((2, 3)), x.amax((2, 3))
        return 0.5 * (mean + peak) if self.pool_type == "avgmax" else torch.cat((mean, peak), 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"
