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

It has timm's model API with timm's meanings (``forward_features``, ``forward_head``, ``reset_classifier``,
``set_grad_checkpointing``, ``group_matcher``, ...; ``pretrained_cfg`` comes from :class:`~.meta.Described`),
and timm's constructor options ``in_chans``, ``global_pool``, ``drop_rate`` and ``drop_path_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..processing.labels import ClassList
from .blocks import Bottleneck
from .explain import Explainable
from .head import Headed
from .input_conv import adapt_input_conv
from .meta import ModelMeta, default_classes
from .optimize import Optimizable
from .pooling import GlobalPool, check_pool_type
from .recompute import run_stage

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


def _stem_conv(stem: str, in_chans: int = 3) -> nn.Module:
    if stem == "7x7":
        return nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    if stem not in STEM_WIDTHS:
        raise ValueError(f"stem must be one of '7x7', {', '.join(map(repr, STEM_WIDTHS))}; got {stem!r}")
    w0, w1 = STEM_WIDTHS[stem]
    return nn.Sequential(
        nn.Conv2d(in_chans, w0, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(w0),
        nn.ReLU(inplace=True),
        nn.Conv2d(w0, w1, 3, padding=1, bias=False),
        nn.BatchNorm2d(w1),
        nn.ReLU(inplace=True),
        nn.Conv2d(w1, 64, 3, padding=1, bias=False),
    )


def check_options(
    *,
    num_classes: object,
    global_pool: object,
    in_chans: object = 3,
    drop_rate: object = 0.0,
    drop_path_rate: object = 0.0,
) -> None:
    """timm's model options, checked: a ``ValueError`` saying what is expected."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier, pooled features), got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int (input channels; 3 for RGB), got {in_chans!r}")
    if check_pool_type(global_pool) == "" and num_classes:
        raise ValueError(
            f"global_pool='' (no pooling) needs num_classes=0: a {num_classes}-class Linear head takes pooled features"
        )
    for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1), got {rate!r}")


class ResNet(Optimizable, Explainable, Headed, nn.Module):
    """ResNet v1.5 with grouped bottlenecks; see :class:`ResNetConfig` for the options.

    ``forward(x)`` takes a normalized float batch ``(N, in_chans, H, W)`` (any H, W >= 32) and
    returns ``fc``'s output on the pooled features: logits ``(N, num_classes)``, or what a replaced
    head gives (``nn.Identity()``: the pooled features). ``extract_features``
    returns intermediate maps, ``explain`` class activation maps (:class:`~.explain.Explainable`).
    ``meta`` (:class:`ModelMeta`) says what it is: ``architecture``,
    ``weights_record`` and ``preprocessing`` read from it; ``classes`` are its names for the head
    the model has (:class:`~.head.Headed`).

    timm's options: ``num_classes=0`` (no classifier: ``fc`` is ``nn.Identity()``), ``in_chans`` (input
    channels), ``global_pool`` (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, or ``""``: unpooled,
    with ``num_classes=0``), ``drop_rate`` (dropout before ``fc``, in training) and ``drop_path_rate``
    (stochastic depth of the residual branches, rising linearly from 0 at the first block to this at the last).
    """

    def __init__(
        self,
        config: ResNetConfig,
        num_classes: int = 1000,
        *,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fused_se: bool = True,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_options(
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.config = config
        meta = meta or ModelMeta.default(num_classes or 1000)
        if num_classes and len(meta.classes) != num_classes:
            raise ValueError(f"{len(meta.classes)} class names for a {num_classes}-class head")
        self.meta = meta
        self.drop_rate = float(drop_rate)
        self.grad_checkpointing = False
        self.conv1 = _stem_conv(config.stem, in_chans)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        total, block_index = sum(config.layers), 0
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
                        # timm's linear rule: 0 at the first block, drop_path_rate at the last
                        drop_path=drop_path_rate * block_index / max(total - 1, 1),
                    )
                )
                in_channels = out_channels
                block_index += 1
            self.add_module(STAGES[index], nn.Sequential(*stage))
        self.num_features = in_channels
        self.global_pool = GlobalPool(global_pool)
        self.fc = self._classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            # Meta weights are placeholders for a checkpoint's tensors: initialising them is wasted work, and
            # normal_'s meta kernel (a torch._refs function) imports torch._dynamo, about a second of a cold start.
            if isinstance(module, nn.Conv2d) and not module.weight.is_meta:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _classifier(self, num_classes: int, device: torch.device | str | None = None) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        return nn.Linear(self.head_hidden_size, num_classes, device=device)

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features ``fc`` takes: ``num_features``, twice that for ``"catavgmax"`` (timm's)."""
        return self.num_features * self.global_pool.feat_mult()

    @property
    def first_conv(self) -> str:
        """The first convolution's name (timm's ``pretrained_cfg["first_conv"]``)."""
        return "conv1" if isinstance(self.conv1, nn.Conv2d) else "conv1.0"

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, *, classes: ClassList | None = None
    ) -> None:
        """timm's: a freshly initialised head ``Linear(head_hidden_size, num_classes)``; 0: none (``nn.Identity()``).

        ``global_pool``: a new pool type (default: keep the current one). ``classes``: the new head's
        names (default: ImageNet's for 1000, else the indices); a head of 0 keeps the model's names.
        """
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        check_options(num_classes=num_classes, global_pool=pool)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for a {num_classes}-class head")
        # On the head's device (any head's, an Identity's too); a head still on the meta device goes to the CPU.
        weight = next(self.fc.parameters(), self.bn1.weight)
        self.global_pool = GlobalPool(pool).train(self.training)
        self.fc = self._classifier(num_classes, device="cpu" if weight.is_meta else weight.device).train(self.training)
        if num_classes:
            # A fresh head: a multi-label one's thresholds were chosen for the weights it replaces.
            self.meta = replace(self.meta.with_classes(classes or default_classes(num_classes)), thresholds=None)

    def adapt_input_channels(self, in_chans: int) -> None:
        """Take ``in_chans`` input channels: the first conv's weights derived from its current ones by
        :func:`~.input_conv.adapt_input_conv` (timm's rule for loading 3-channel weights into such a model)."""
        conv = self.conv1 if isinstance(self.conv1, nn.Conv2d) else self.conv1[0]
        adapted = nn.Conv2d(
            in_chans,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=False,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            adapted.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if isinstance(self.conv1, nn.Conv2d):
            self.conv1 = adapted
        else:
            self.conv1[0] = adapted

    # -- timm's training API ---------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's: recompute each block's activations in the backward pass instead of keeping them.

        Same loss and gradients, less activation memory, one more forward pass of each block. The recomputation
        does not update BatchNorm's running statistics a second time (timm's does), so the
        statistics after a step are also those of a run without checkpointing.
        """
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups (for layer-wise learning-rate decay): the stem, then each block (stage if coarse)."""
        return {"stem": r"^conv1|bn1|maxpool", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        """Parameters to exempt from weight decay by name: none (timm exempts biases and norms by their shape)."""
        return set()

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
        last = None if stop_early or intermediates_only else len(STAGES)
        x, maps = stage_outputs(self, x, wanted, last=last, checkpointed=self.grad_checkpointing)
        return maps if intermediates_only else (x, maps)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's maps ``(N, num_features, H/32, W/32)``, unpooled (timm's)."""
        x = self.forward_stem(x)
        for name in STAGES:
            x = run_stage(getattr(self, name), x, self.grad_checkpointing)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's: pool ``forward_features``' maps, dropout (``drop_rate``, in training), ``fc``.

        ``pre_logits``: the pooled features (``(N, head_hidden_size)``), before ``fc``.
        """
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

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
    model: nn.Module, x: Tensor, indices: Sequence[int], last: int | None = None, *, checkpointed: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """Run the stem and the stages through ``last`` (default: the last wanted); (its output, the wanted maps).

    ``model``: a :class:`ResNet`, or a module holding its stem and stages under the same names.
    ``checkpointed``: with gradient checkpointing (see :func:`~.recompute.run_stage`).
    """
    features = []
    x = model.act1(model.bn1(model.conv1(x)))
    if 0 in indices:
        features.append(x)
    x = model.maxpool(x)
    for index in range(1, (max(indices, default=0) if last is None else last) + 1):
        x = run_stage(getattr(model, f"layer{index}"), x, checkpointed)
        if index in indices:
            features.append(x)
    return x, features
