"""The fused inference network: BatchNorm folded into the convolutions, SE as matmuls, one memory format and dtype.

:class:`OptimizedResNet` computes a :class:`~.resnet.ResNet`'s function in eval mode, and why each step
keeps the numbers:

- Every BatchNorm is folded into the convolution before it (``w * g / sqrt(v + eps)``, a bias
  ``b - m * g / sqrt(v + eps)``): one conv instead of conv + a memory-bound BN pass.
- Activations are channels-last (NHWC), the layout oneDNN (CPU) and cuDNN (tensor cores) run
  convolutions fastest in; the SE block becomes two small matmuls on the pooled vector and one
  ``addcmul`` (shortcut + out * gate), as NVIDIA's ``fused_se``.
- ``bf16`` and ``fp16`` convert the weights once, instead of autocast re-casting them on every
  call; the outputs come back as fp32.
- 1x1 convolutions on small maps (batch 1 in the last stages) run as one matmul, which oneDNN
  does faster there than its convolution (see :class:`PointwiseConv`).
- On the CPU, the ReLU after ``conv1`` and ``conv2`` (and a plain block's residual sum and ReLU after
  ``conv3``) run inside oneDNN's convolution (:func:`onednn_conv`; bf16 weights packed once): the same
  numbers, one memory pass fewer per layer.
- The head is the model's own module (``fc``, copied as it is: a Linear, a replaced head, an
  ``Identity``), on the features pooled as the model pools them (``global_pool``).

:class:`CompiledResNet` adds ``torch.compile``. Which copy to build is :mod:`.optimize`'s choice.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Bottleneck
from .explain import Explainable, Explanation, Target
from .head import Headed, head_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pointwise: bool = False) -> nn.Conv2d:
    """A new conv (with bias) equal to ``bn(conv(x))`` with ``bn`` in eval mode; inputs are not changed.

    ``pointwise``: return a :class:`PointwiseConv` (``conv`` must be 1x1, stride 1).
    """
    # Computed in float64: the fold itself must not add rounding error to a 100-layer stack.
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    if pointwise and (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1):
        raise ValueError(f"pointwise folding needs a 1x1 stride-1 ungrouped conv, got {conv}")
    fused = (PointwiseConv if pointwise else nn.Conv2d)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        device=conv.weight.device,
    )
    with torch.no_grad():
        fused.weight.copy_(weight.to(conv.weight.dtype))
        fused.bias.copy_(bias.to(conv.weight.dtype))
    return fused


def _linear_from_conv1x1(conv: nn.Conv2d) -> nn.Linear:
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device=conv.weight.device)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _spatial_mean(x: Tensor) -> Tensor:
    """``x.mean((2, 3))``; in bf16 on CPU as a matmul with ones (oneDNN's bf16 reduction is slow).

    Measured: 1.2 ms instead of 4.4 ms for a 16x256x56x56 batch; the GEMM accumulates in fp32
    and rounds once, as accurate as ``mean``. The 1/HW scale is applied afterwards, not folded
    into the ones, which bf16 cannot hold exactly.
    """
    if x.dtype != torch.bfloat16 or x.is_cuda:
        return x.mean((2, 3))
    hw = x.shape[2] * x.shape[3]
    rows = x.permute(0, 2, 3, 1).flatten(1, 2)  # (N, HW, C): a view when x is channels-last
    return torch.matmul(x.new_ones(1, hw), rows).squeeze(1) / hw


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _building_graph() -> bool:
    """Whether this call is traced, scripted or exported: a graph for other runtimes, which take the plain ops."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or _is_exporting()


class PointwiseConv(nn.Conv2d):
    """A 1x1 stride-1 conv that runs as one matmul on small channels-last CPU maps.

    oneDNN's 1x1 convolution is slow on small maps (batch 1, 14x14 and 7x7): measured in bf16,
    2.0 ms as a conv against 0.55 ms as ``linear`` on the (N*H*W, C) view for 2048->1024 at 7x7,
    0.73 against 0.49 ms for 1024->512 at 14x14; on large maps the conv is faster. Same function;
    traced and exported graphs always use the conv.
    """

    MAX_ROWS = 400  # N*H*W up to which the matmul wins (batch 1-2 at 14x14, batch 1-8 at 7x7)

    def runs_as_matmul(self, x: Tensor) -> bool:
        """Whether ``forward`` runs ``x`` as a matmul: a small channels-last CPU map in eager mode."""
        if _building_graph():
            return False  # a graph for other runtimes: no shape-dependent branch
        n, _, h, w = x.shape
        return n * h * w <= self.MAX_ROWS and not x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if not self.runs_as_matmul(x):
            return super().forward(x)
        n, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, self.in_channels)
        out = F.linear(rows, self.weight.view(self.out_channels, self.in_channels), self.bias)
        return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)  # channels-last, like the conv's


def _conv_pointwise_op() -> Any:
    """oneDNN's convolution with a fused post-op (the op inductor's CPU fusion emits), or None in a build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


_CONV_POINTWISE = _conv_pointwise_op()


def _version(tensor: Tensor) -> int:
    """The tensor's in-place change counter; -1 for an inference-mode tensor, which has none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class _PackedWeight:
    """oneDNN's blocked copy of one conv's weight, made on first use; copies and pickles start empty.

    (An opaque oneDNN tensor can be neither deep-copied nor saved, and the model is both.)
    """

    __slots__ = ("key", "tensor")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensor: Tensor | None = None

    def __reduce__(self) -> tuple:
        return (_PackedWeight, ())

    def get(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        weight = conv.weight
        key = (weight.data_ptr(), _version(weight), weight.dtype, tuple(weight.shape))
        if self.key != key:  # first call, or the weights were changed or converted since
            self.tensor = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(),
                list(conv.padding),
                list(conv.stride),
                list(conv.dilation),
                conv.groups,
                list(x.shape),
            )
            self.key = key
        return self.tensor


def onednn_conv(conv: nn.Conv2d, x: Tensor, *, residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """``conv(x)``, plus ``residual`` if given, then ReLU if ``relu``. On the CPU, in eager mode, on a
    channels-last batch: one oneDNN call (on weights packed once in bf16), with the sum and the ReLU as its post-ops.
    The ReLU alone is bit-identical (applied before the output's rounding, and rounding keeps signs); the sum
    is rounded once instead of twice. Measured on an Intel Xeon with AMX, SE-ResNeXt101 layer shapes
    at batch 16 in bf16: 1.1-1.9x faster per layer. Traced, exported and compiled graphs get the plain conv and
    ReLU (their runtimes fuse them themselves).
    """
    if (
        _CONV_POINTWISE is None
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or x.dtype != conv.weight.dtype
        or not x.is_contiguous(memory_format=torch.channels_last)
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or _building_graph()
        or torch.compiler.is_compiling()
        or (isinstance(conv, PointwiseConv) and conv.runs_as_matmul(x))
        or (
            residual is not None
            and (residual.dtype != x.dtype or not residual.is_contiguous(memory_format=torch.channels_last))
        )
    ):
        out = conv(x) if residual is None else conv(x).add_(residual)
        return F.relu(out, inplace=True) if relu else out
    # Packed in bf16 only: measured on SE-ResNeXt101 (Intel Xeon with AMX), packing made bf16 5% faster at no
    # measurable memory, and fp32 2% faster for a second copy of the weights (+172 MiB).
    weight = conv.weight
    if x.dtype == torch.bfloat16:
        weight = conv.__dict__.setdefault("_packed_weight", _PackedWeight()).get(conv, x)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    post_op = "relu" if relu else None
    if residual is not None:
        return _CONV_POINTWISE.binary(x, residual, weight, conv.bias, *geometry, "add", 1.0, post_op, [], "")
    return _CONV_POINTWISE(x, weight, conv.bias, *geometry, post_op or "none", [], "")


class FusedBottleneck(nn.Module):
    """A :class:`~.blocks.Bottleneck` with BN folded and SE as matmuls on the pooled vector + addcmul."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = fold_batchnorm(block.conv1, block.bn1, pointwise=True)
        self.conv2 = fold_batchnorm(block.conv2, block.bn2)
        self.conv3 = fold_batchnorm(block.conv3, block.bn3, pointwise=True)
        self.se_fc1 = self.se_fc2 = None
        if block.se is not None:
            self.se_fc1 = _linear_from_conv1x1(block.se.fc1)
            self.se_fc2 = _linear_from_conv1x1(block.se.fc2)
        self.downsample = None
        if block.downsample is not None:
            *pool, conv, bn = block.downsample
            self.downsample = nn.Sequential(*copy.deepcopy(pool), fold_batchnorm(conv, bn))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        mid = onednn_conv(self.conv2, onednn_conv(self.conv1, x, relu=True), relu=True)
        if self.se_fc1 is None:
            return onednn_conv(self.conv3, mid, residual=shortcut, relu=True)
        out = onednn_conv(self.conv3, mid)
        pooled = _spatial_mean(out)
        gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(pooled), inplace=True)))
        out = torch.addcmul(shortcut, out, gate[:, :, None, None])
        return F.relu(out, inplace=True)


def _fold_stem(stem: nn.Module, bn: nn.BatchNorm2d) -> nn.Sequential:
    """The stem convs (a single 7x7, or a deep conv-BN-ReLU stack) with every BN folded."""
    if isinstance(stem, nn.Conv2d):
        return nn.Sequential(fold_batchnorm(stem, bn), nn.ReLU(inplace=True))
    layers = list(stem)
    folded: list[nn.Module] = []
    index = 0
    while index < len(layers):
        layer = layers[index]
        if isinstance(layer, nn.Conv2d):
            next_bn = layers[index + 1] if index + 1 < len(layers) else bn
            folded.append(fold_batchnorm(layer, next_bn))
            index += 2 if index + 1 < len(layers) else 1
        else:
            folded.append(copy.deepcopy(layer))
            index += 1
    return nn.Sequential(*folded, nn.ReLU(inplace=True))


class OptimizedResNet(Explainable, Headed, nn.Module):
    """Inference-only ResNet: folded BN, fused SE, a fixed memory format and compute dtype.

    ``model``: a :class:`~.resnet.ResNet` (this module reads its ``conv1``, ``bn1``, ``maxpool``,
    ``layer1``..``layer4`` of :class:`~.blocks.Bottleneck` blocks, ``global_pool``, ``fc``, ``num_features``,
    ``first_conv`` and ``meta``). ``forward`` takes the same fp32 NCHW (or NHWC) batch as the original model
    and returns fp32 outputs; the conversion to the compute layout and dtype happens inside. timm's inference
    API: ``forward_features`` (in the compute dtype and layout), ``forward_head``, ``get_classifier``,
    ``pretrained_cfg``; ``explain`` gives class activation maps from these features (:class:`~.explain.Explainable`).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        # The class names travel resolved against the head (index names for a resized one), as model.classes.
        self.meta = model.meta.with_classes(model.classes) if head_size(model.fc) else model.meta
        self.num_features = model.num_features
        self.first_conv = model.first_conv
        self.stem = _fold_stem(model.conv1, model.bn1)
        self.maxpool = copy.deepcopy(model.maxpool)
        stages = [getattr(model, name) for name in ("layer1", "layer2", "layer3", "layer4")]
        self.stages = nn.Sequential(*(nn.Sequential(*map(FusedBottleneck, stage)) for stage in stages))
        self.global_pool = copy.deepcopy(model.global_pool)
        self.fc = copy.deepcopy(model.fc)  # the user's head as it is (a replaced one included)
        self.dtype = dtype
        self.channels_last = channels_last
        self.precision = next(name for name, value in DTYPES.items() if value == dtype)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(dtype=dtype, memory_format=memory_format)
        self.requires_grad_(False)
        self.eval()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's maps, unpooled, in the compute dtype and memory format."""
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stages(self.maxpool(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and not torch.backends.cudnn.benchmark and not torch.compiler.is_compiling():
            # cuDNN picks the fastest algorithm per input shape once (inference shapes repeat),
            # for this call only: the process-wide setting stays the caller's.
            with _cudnn_benchmark():
                return self.forward(x)
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's: the pooled features (``pre_logits``) or ``fc``'s output on them, as fp32."""
        x = self.global_pool(x)
        return (x if pre_logits else self.fc(x)).float()


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class CompiledResNet(Headed, nn.Module):
    """``torch.compile`` of an :class:`OptimizedResNet`, keeping its ``meta``, head and ``precision``.

    Every batch size is one more compiled variant of the shared ``forward``; past dynamo's
    default limit of 8 it would silently fall back to eager, so calls raise the limit for
    their own duration only (``torch._dynamo.config.patch``), not for the whole process.
    """

    RECOMPILE_LIMIT = 64

    def __init__(self, module: OptimizedResNet, device: torch.device) -> None:
        super().__init__()
        self.meta = module.meta
        self.precision = module.precision
        self.num_features = module.num_features
        self.first_conv = module.first_conv
        # Freezing turns the weights into constants, so inductor can pre-pack them for oneDNN and
        # fuse bias + ReLU (+ add) into the convolutions; it is only valid without autograd.
        options = {"freezing": True} if device.type == "cpu" else {}
        self.compiled = torch.compile(module, options=options, dynamic=False)

    @property
    def fc(self) -> nn.Module:
        """The compiled copy's head (``classes`` and ``num_classes`` follow it)."""
        return self.compiled._orig_mod.fc

    def explanation(self, x: Tensor, target: Target = None) -> Explanation:
        """The class activation maps of the compiled copy's network (:class:`~.explain.Explainable`), run
        uncompiled: compiling it too would add a compile per batch size for a call that is rarely on a hot path."""
        return self.compiled._orig_mod.explanation(x, target)

    def explain(self, x: Tensor, target: Target = None) -> Tensor:
        """The maps of :meth:`explanation`."""
        return self.explanation(x, target).maps

    def forward(self, x: Tensor) -> Tensor:
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            return self.compiled(x)
