"""The layers a :class:`~.resnet.ResNet` is built of: the grouped bottleneck block, its squeeze-and-excitation
and its stochastic depth (timm's ``DropPath``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): in training, zero each sample's residual branch with probability
    ``p`` and scale the kept ones by ``1 / (1 - p)``; the identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # One draw per sample, in timm's order (new_empty + bernoulli_), so a seeded run drops the same samples.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3 (stride)-BN-ReLU, conv1x1-BN, [SE], [drop path], + shortcut, ReLU."""

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
        drop_path: float = 0.0,
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
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.drop_path is not None and self.training:
            # The branch is dropped whole, SE included (timm's order): no fused addcmul here.
            out = self.drop_path(out if self.se is None else self.se(out))
            return self.act3(out + shortcut)
        if self.se is not None:
            if self.fused_se:
                # NVIDIA's fused_se: shortcut + out * gate in one addcmul.
                return self.act3(torch.addcmul(shortcut, out, self.se.gate(out)))
            out = self.se(out)
        return self.act3(out + shortcut)
