"""The network as a backbone: stage outputs as a list (timm's ``features_only``) with their ``feature_info``.

The stage outputs themselves are :func:`~.resnet.stage_outputs` (shared with ``ResNet.forward_intermediates``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .meta import Described
from .resnet import FEATURE_MODULES, ResNet, feature_indices, stage_outputs

REDUCTIONS = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    """Channels, reduction (stride) and module of each returned feature map, as timm's ``feature_info``."""

    entries: tuple[dict, ...]

    @classmethod
    def of(cls, model: ResNet, indices: Sequence[int]) -> FeatureInfo:
        channels = [model.conv1_channels, *(getattr(model, f"layer{i}")[-1].conv3.out_channels for i in (1, 2, 3, 4))]
        return cls(
            tuple(
                {"num_chs": channels[i], "reduction": REDUCTIONS[i], "module": FEATURE_MODULES[i], "index": i}
                for i in indices
            )
        )

    def channels(self) -> list[int]:
        return [e["num_chs"] for e in self.entries]

    def reduction(self) -> list[int]:
        return [e["reduction"] for e in self.entries]

    def module_name(self) -> list[str]:
        return [e["module"] for e in self.entries]

    @property
    def out_indices(self) -> tuple[int, ...]:
        return tuple(e["index"] for e in self.entries)

    def get_dicts(self) -> list[dict]:
        return [dict(e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.get_dicts())


class ResNetFeatures(Described, nn.Module):
    """``model`` as a backbone: ``forward(x)`` returns the feature maps ``out_indices`` (a list, NCHW).

    Holds only the modules those outputs need, under the model's own names (``conv1``,
    ``layer1``, ...), so a checkpoint of the whole model loads with ``strict=False``.
    """

    def __init__(self, model: ResNet, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        indices = feature_indices(out_indices)
        self.meta = model.meta
        self.first_conv = model.first_conv
        self.feature_info = FeatureInfo.of(model, indices)
        for name in ("conv1", "bn1", "act1", "maxpool", *(f"layer{i}" for i in range(1, max(indices) + 1))):
            self.add_module(name, getattr(model, name))

    def forward(self, x: Tensor) -> list[Tensor]:
        return stage_outputs(self, x, self.feature_info.out_indices)[1]
