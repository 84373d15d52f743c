"""One ResNet class for ResNeXt, SE-ResNeXt and timm's SE-ResNeXt "d"/"t" variants.

The network is the "ResNet v1.5" bottleneck design (stride on the grouped 3x3 conv).
Everything that differs between NVIDIA's and timm's models is an option of
:class:`ResNetConfig`: the stem, the shortcut of downsampling blocks and the SE width.
Parameter names follow timm's layout (``conv1``, ``layer1.0.se.fc1``, ``fc``); the loader
maps NVIDIA's checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..processing.labels import ClassList
from .meta import Described, ModelMeta, default_classes

STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURES = (*STAGES, "classifier")


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


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` with 1x1 convs (bias) as the two layers."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def gate(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3 (stride)-BN-ReLU, conv1x1-BN, [SE], + shortcut, ReLU."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        *,
        stride: int,
        groups: int,
        se_hidden: int | None,
        downsample: nn.Module | None,
        fused_se: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_hidden) if se_hidden else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.fused_se = fused_se

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            if self.fused_se:
                # NVIDIA's fused_se: shortcut + out * gate in one addcmul.
                return self.act3(torch.addcmul(shortcut, out, self.se.gate(out)))
            out = self.se(out)
        return self.act3(out + shortcut)


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


class ResNet(Described, nn.Module):
    """ResNet v1.5 with grouped bottlenecks; see :class:`ResNetConfig` for the options.

    ``forward(x)`` takes a normalized float batch ``(N, 3, H, W)`` (any H, W >= 32) and
    returns logits ``(N, num_classes)``. ``extract_features`` returns intermediate maps.
    ``meta`` (:class:`ModelMeta`) says what it is: ``architecture``, ``weights_record``,
    ``preprocessing`` and ``classes`` read from it.
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
            # Meta weights are placeholders for a checkpoint's tensors: initialising them is wasted work, and
            # normal_'s meta kernel (a torch._refs function) imports torch._dynamo, about a second of a cold start.
            if isinstance(module, nn.Conv2d) and not module.weight.is_meta:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def classes(self) -> ClassList:
        # A head replaced by hand (model.fc = nn.Linear(...)) gets index names, not stale ones.
        return self.meta.classes if len(self.meta.classes) == self.num_classes else default_classes(self.num_classes)

    def reset_classifier(self, num_classes: int, classes: ClassList | None = None) -> None:
        """Replace the head by a freshly initialised ``Linear(num_features, num_classes)``."""
        classes = classes or default_classes(num_classes)
        if len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for a {num_classes}-class head")
        device = self.fc.weight.device if not self.fc.weight.is_meta else "cpu"
        self.fc = nn.Linear(self.num_features, num_classes, device=device)
        self.meta = self.meta.with_classes(classes)

    def optimize_for_inference(
        self,
        precision: str = "auto",
        channels_last: bool = True,
        compile: bool = False,
        *,
        reuse_memory: bool = True,
        calibration: Any = None,
        int8_backend: str = "auto",
    ) -> nn.Module:
        """A faster inference-only copy of this model (BN folded, channels-last, bf16/fp16/int8).

        ``precision``: ``"auto"`` (fastest faithful: int8 when ``calibration`` is given on CPUs
        with VNNI/AMX, else bf16 on CPUs with native bf16, fp16 on CUDA, else fp32), ``"fp32"``
        (exact), ``"bf16"``, ``"fp16"``, ``"int8"`` (needs ``calibration``: image paths/URLs/PIL
        images, or preprocessed batches; ``int8_backend`` ``"auto"``, ``"openvino"`` or ``"torchao"``).
        ``compile=True`` adds ``torch.compile`` (tens of seconds on the first call). This model is
        not changed. ``reuse_memory``: a one-time, process-wide glibc switch on Linux CPUs (see
        :func:`resnext_hub.models.optimize.optimize_for_inference`).
        """
        # Imported here: optimize.py builds on this module's classes.
        from .optimize import optimize_for_inference

        return optimize_for_inference(
            self,
            precision=precision,
            channels_last=channels_last,
            compile=compile,
            reuse_memory=reuse_memory,
            calibration=calibration,
            int8_backend=int8_backend,
        )

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
        from .features import feature_indices, stage_outputs  # features.py builds on this module

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
