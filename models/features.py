"""The network as a backbone: stage outputs as a list (timm's ``features_only``) with their ``feature_info``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .meta import Described
from .resnet import ResNet

# timm's feature points of a ResNet: the stem's activation, then each stage.
FEATURE_MODULES = ("act1", "layer1", "layer2", "layer3", "layer4")
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


def feature_indices(indices: int | Sequence[int] | None) -> list[int]:
    """timm's convention: None = all five, an int n = the last n, else the listed indices (negative allowed)."""
    count = len(FEATURE_MODULES)
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= count:
            raise ValueError(f"indices={indices}: the last n feature maps need 1 <= n <= {count}")
        return list(range(count - indices, count))
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ValueError(
                f"feature index {index!r} is out of range: expected integers in 0..{count - 1} or -{count}..-1"
            )
        resolved.append(index % count)
    if not resolved or resolved != sorted(set(resolved)):
        raise ValueError(f"feature indices must be distinct and increasing, got {list(indices)}")
    return resolved


def stage_outputs(
    model: nn.Module, x: Tensor, indices: Sequence[int], last: int | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Run the stem and the stages through ``last`` (default: the last wanted); (its output, the wanted maps)."""
    features = []
    x = model.act1(model.bn1(model.conv1(x)))
    if 0 in indices:
        features.append(x)
    x = model.maxpool(x)
    for index in range(1, (max(indices, default=0) if last is None else last) + 1):
        x = getattr(model, f"layer{index}")(x)
        if index in indices:
            features.append(x)
    return x, features


class ResNetFeatures(Described, nn.Module):
    """``model`` as a backbone: ``forward(x)`` returns the feature maps ``out_indices`` (a list, NCHW).

    Holds only the modules those outputs need, under the model's own names (``conv1``,
    ``layer1``, ...), so a checkpoint of the whole model loads with ``strict=False``.
    """

    def __init__(self, model: ResNet, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        indices = feature_indices(out_indices)
        self.meta = model.meta
        self.feature_info = FeatureInfo.of(model, indices)
        for name in ("conv1", "bn1", "act1", "maxpool", *(f"layer{i}" for i in range(1, max(indices) + 1))):
            self.add_module(name, getattr(model, name))

    def forward(self, x: Tensor) -> list[Tensor]:
        return stage_outputs(self, x, self.feature_info.out_indices)[1]
