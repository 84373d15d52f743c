"""One ResNet class for ResNeXt, SE-ResNeXt and timm's SE-ResNeXt "d"/"t" variants.

The network is the "ResNet v1.5" bottleneck design (stride on the grouped 3x3 conv).
Everything that differs between NVIDIA's and timm's models is an option of
:class:`ResNetConfig`: the stem, the shortcut of downsampling blocks and the SE width.
Parameter names follow timm's layout (``conv1``, ``layer1.0.se.fc1``, ``fc``); the loader
maps NVIDIA's checkpoint names onto them. The stage outputs (timm's feature points) are computed
here too: :mod:`.features` builds its backbone on them.

The class composes what it shares with its fast copies: the head rules (:class:`~.head.Headed`:
``classes`` and ``num_classes`` follow ``fc``) and the optimizer's method
(:class:`~.optimize.Optimizable`); those modules never import this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..processing.labels import ClassList
from .blocks import Bottleneck
from .head import Headed
from .meta import ModelMeta, default_classes
from .optimize import Optimizable

STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURES = (*STAGES, "classifier")
# timm's feature points of a ResNet: the stem's activation, then each stage.
FEATURE_MODULES = ("act1", *STAGES)


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of one variant.

    ``stem``: ``"7x7"`` (one 7x7 conv), ``"deep"`` (three 3x3 convs, widths 32, 32, 64) or
    ``"tiered"`` (widths 24, 32, 64). ``avg_down``: downsampling shortcuts average-pool
    first, then use a stride-1 1x1 conv. ``se_hidden``: a fixed SE hidden width (NVIDIA's
    16); ``se_reduction``: hidden = channels / reduction rounded to a multiple of 8 (timm's).
    """

    layers: tuple[int, int, int, int]
    groups: int = 32
    widths: tuple[int, int, int, int] = (128, 256, 512, 1024)
    expansion: int = 2
    stem: str = "7x7"
    avg_down: bool = False
    se_hidden: int | None = None
    se_reduction: int | None = None

    def se_width(self, channels: int) -> int | None:
        if self.se_hidden is not None:
            return self.se_hidden
        if self.se_reduction is not None:
            return _round_to_multiple(channels / self.se_reduction, 8)
        return None


def _round_to_multiple(value: float, divisor: int) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    # Never round down by more than 10%.
    return rounded + divisor if rounded < 0.9 * value else rounded


STEM_WIDTHS = {"deep": (32, 32), "tiered": (24, 32)}


def _downsample(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    if avg_down:
        pool: nn.Module = (
            nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        )
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        return nn.Sequential(pool, conv, nn.BatchNorm2d(out_channels))
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def _stem_conv(stem: str) -> nn.Module:
    if stem == "7x7":
        return nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    if stem not in STEM_WIDTHS:
        raise ValueError(f"stem must be one of '7x7', {', '.join(map(repr, STEM_WIDTHS))}; got {stem!r}")
    w0, w1 = STEM_WIDTHS[stem]
    return nn.Sequential(
        nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(w0),
        nn.ReLU(inplace=True),
        nn.Conv2d(w0, w1, 3, padding=1, bias=False),
        nn.BatchNorm2d(w1),
        nn.ReLU(inplace=True),
        nn.Conv2d(w1, 64, 3, padding=1, bias=False),
    )


class ResNet(Optimizable, Headed, nn.Module):
    """ResNet v1.5 with grouped bottlenecks; see :class:`ResNetConfig` for the options.

    ``forward(x)`` takes a normalized float batch ``(N, 3, H, W)`` (any H, W >= 32) and
    returns ``fc``'s output on the pooled features: logits ``(N, num_classes)``, or what a replaced
    head gives (``nn.Identity()``: the ``num_features`` pooled features). ``extract_features``
    returns intermediate maps. ``meta`` (:class:`ModelMeta`) says what it is: ``architecture``,
    ``weights_record`` and ``preprocessing`` read from it; ``classes`` are its names for the head
    the model has (:class:`~.head.Headed`).
    """

    def __init__(
        self, config: ResNetConfig, num_classes: int = 1000, *, fused_se: bool = True, meta: ModelMeta | None = None
    ) -> None:
        super().__init__()
        self.config = config
        meta = meta or ModelMeta.default(num_classes)
        if len(meta.classes) != num_classes:
            raise ValueError(f"{len(meta.classes)} class names for a {num_classes}-class head")
        self.meta = meta
        self.conv1 = _stem_conv(config.stem)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (blocks, width) in enumerate(zip(config.layers, config.widths)):
            out_channels = width * config.expansion
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(
                    Bottleneck(
                        in_channels,
                        width,
                        out_channels,
                        stride=stride if block == 0 else 1,
                        groups=config.groups,
                        se_hidden=config.se_width(out_channels),
                        downsample=_downsample(in_channels, out_channels, stride, config.avg_down)
                        if block == 0
                        else None,
                        fused_se=fused_se,
                    )
                )
                in_channels = out_channels
            self.add_module(STAGES[index], nn.Sequential(*stage))
        self.num_features = in_channels
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int, classes: ClassList | None = None) -> None:
        """Replace the head by a freshly initialised ``Linear(num_features, num_classes)``."""
        classes = classes or default_classes(num_classes)
        if len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for a {num_classes}-class head")
        # On the head's device (any head's, an Identity's too); a head still on the meta device goes to the CPU.
        weight = next(self.fc.parameters(), self.bn1.weight)
        self.fc = nn.Linear(self.num_features, num_classes, device="cpu" if weight.is_meta else weight.device)
        self.meta = self.meta.with_classes(classes)

    @property
    def conv1_channels(self) -> int:
        """Channels of the stem's output (``act1``), the first feature map."""
        return self.bn1.num_features

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``forward_intermediates``: the feature maps ``indices`` (0 = stem, 1-4 = stages).

        ``indices``: None (all five), n (the last n) or a list. Returns ``(final features, maps)``:
        the final features are ``layer4``'s output (before pooling; ``forward_head`` gives the
        logits), or the last computed map with ``stop_early``; ``intermediates_only`` returns the maps.
        """
        wanted = feature_indices(indices)
        x, maps = stage_outputs(self, x, wanted, last=None if stop_early or intermediates_only else len(STAGES))
        return maps if intermediates_only else (x, maps)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.forward_head(x)

    def extract_features(self, x: Tensor, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Outputs of the requested ``layer1``..``layer4`` and/or ``classifier`` (logits).

        Stops after the last requested stage. ``layers=None`` returns all five.
        """
        wanted = list(FEATURES) if layers is None else list(layers)
        unknown = [name for name in wanted if name not in FEATURES]
        if unknown:
            raise ValueError(f"extract_features: unknown layers {unknown}; expected names from {list(FEATURES)}")
        last = max(FEATURES.index(name) for name in wanted) if wanted else -1
        features: dict[str, Tensor] = {}
        if last < 0:
            return features
        x = self.forward_stem(x)
        for name in STAGES[: min(last, len(STAGES) - 1) + 1]:
            x = getattr(self, name)(x)
            if name in wanted:
                features[name] = x
        if "classifier" in wanted:
            features["classifier"] = self.forward_head(x)
        return features


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
    """Run the stem and the stages through ``last`` (default: the last wanted); (its output, the wanted maps).

    ``model``: a :class:`ResNet`, or a module holding its stem and stages under the same names.
    """
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
