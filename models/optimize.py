"""An inference-only copy of a :class:`~.resnet.ResNet`: BatchNorm folded, channels-last, fused SE, low precision.

``optimize_for_inference(model)`` returns a new module computing the same function as ``model``
in eval mode; the original is left as it was. What it does, and why each step keeps the numbers:

- Every BatchNorm is folded into the convolution before it (``w * g / sqrt(v + eps)``, a bias
  ``b - m * g / sqrt(v + eps)``): one conv instead of conv + a memory-bound BN pass.
- Activations are channels-last (NHWC), the layout oneDNN (CPU) and cuDNN (tensor cores) run
  convolutions fastest in; the SE block becomes two small matmuls on the pooled vector and one
  ``addcmul`` (shortcut + out * gate), as NVIDIA's ``fused_se``.
- ``bf16`` (CPUs with native bf16 instructions) and ``fp16`` (CUDA) convert the weights once,
  instead of autocast re-casting them on every call; the logits come back as fp32.
- On Linux CPUs, glibc is told to keep freed memory for reuse (``reuse_memory``, see :func:`reuse_freed_memory`):
  activations of tens of MB are otherwise mapped fresh from the OS on every call, and the page
  faults can double the time of the layer that fills them.
- 1x1 convolutions on small maps (batch 1 in the last stages) run as one matmul, which oneDNN
  does faster there than its convolution (see :class:`PointwiseConv`).
- ``compile=True`` adds ``torch.compile`` (with weight freezing on CPU, which lets inductor
  pre-pack the convolution weights for oneDNN and fuse bias/ReLU/add into them).
- ``int8`` (x86 CPUs with VNNI or AMX) quantizes the exact copy, calibrated on the caller's images
  (:mod:`.quantize`: OpenVINO + NNCF, or torchao's PT2E + inductor; optional dependencies).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .meta import Described
from .resnet import Bottleneck, ResNet

if TYPE_CHECKING:
    from .quantize import Calibration

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Faithfulness of a reduced-precision copy, checked by "auto" on a random input (see _faithful).
MIN_COSINE = 0.999


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


class PointwiseConv(nn.Conv2d):
    """A 1x1 stride-1 conv that runs as one matmul on small channels-last CPU maps.

    oneDNN's 1x1 convolution is slow on small maps (batch 1, 14x14 and 7x7): measured in bf16,
    2.0 ms as a conv against 0.55 ms as ``linear`` on the (N*H*W, C) view for 2048->1024 at 7x7,
    0.73 against 0.49 ms for 1024->512 at 14x14; on large maps the conv is faster. Same function;
    traced and exported graphs always use the conv.
    """

    MAX_ROWS = 400  # N*H*W up to which the matmul wins (batch 1-2 at 14x14, batch 1-8 at 7x7)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _is_exporting():
            return super().forward(x)  # a graph for other runtimes: no shape-dependent branch
        n, _, h, w = x.shape
        if n * h * w > self.MAX_ROWS or x.is_cuda or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, self.in_channels)
        out = F.linear(rows, self.weight.view(self.out_channels, self.in_channels), self.bias)
        return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)  # channels-last, like the conv's


class FusedBottleneck(nn.Module):
    """A :class:`~.resnet.Bottleneck` with BN folded and SE as matmuls on the pooled vector + addcmul."""

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
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(self.conv2(out), inplace=True)
        out = self.conv3(out)
        if self.se_fc1 is None:
            return F.relu(out.add_(shortcut), inplace=True)
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


class OptimizedResNet(Described, nn.Module):
    """Inference-only ResNet: folded BN, fused SE, a fixed memory format and compute dtype.

    ``forward`` takes the same fp32 NCHW (or NHWC) batch as the original model and returns
    fp32 logits; the conversion to the compute layout and dtype happens inside.
    """

    def __init__(self, model: ResNet, *, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.meta = model.meta.with_classes(model.classes)
        self.stem = _fold_stem(model.conv1, model.bn1)
        self.maxpool = copy.deepcopy(model.maxpool)
        stages = [getattr(model, name) for name in ("layer1", "layer2", "layer3", "layer4")]
        self.stages = nn.Sequential(*(nn.Sequential(*map(FusedBottleneck, stage)) for stage in stages))
        self.fc = copy.deepcopy(model.fc)
        self.dtype = dtype
        self.channels_last = channels_last
        self.precision = next(name for name, value in DTYPES.items() if value == dtype)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(dtype=dtype, memory_format=memory_format)
        self.requires_grad_(False)
        self.eval()

    def forward_features(self, x: Tensor) -> Tensor:
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
        pooled = self.forward_features(x).mean((2, 3))
        return self.fc(pooled).float()


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them oneDNN emulates bf16 and runs slower than fp32, so "auto" must not pick it.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    # No /proc/cpuinfo (macOS, Windows): trust oneDNN's own check where it has one.
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(checker is not None and checker() and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc keep freed large blocks in the heap for reuse instead of unmapping them.

    By default glibc serves every allocation over 32 MB (at most) with a fresh ``mmap`` and
    returns it on free, so each large activation costs page faults on first touch: measured
    here, copying a 51 MB tensor took 15.5 ms instead of 3 ms, and a 1x1 conv writing one 32 ms
    instead of 17 ms. This raises the mmap and trim thresholds (``mallopt``) once per process:
    the process keeps its peak memory mapped. Returns False where it does not apply (no glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    applied = mallopt(m_mmap_threshold, 1 << 30) == 1 and mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    log.debug("glibc mallopt: keep freed memory for reuse: %s", applied)
    return applied


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _candidates(device: torch.device, calibrated: bool, backend: str = "auto") -> list[str]:
    """Reduced precisions worth trying on ``device``, fastest first (measured, see benchmarks/).

    int8 only with calibration data, on a CPU with int8 dot products and a backend installed.
    """
    if device.type == "cuda":
        return ["fp16"]
    candidates = []
    if device.type == "cpu" and calibrated:
        from .quantize import INSTALL_HINT, available_backends, cpu_has_int8_dot

        if not cpu_has_int8_dot():
            log.info("optimize_for_inference: no int8 dot-product instructions (VNNI/AMX) on this CPU: not trying int8")
        elif not available_backends() or backend not in ("auto", *available_backends()):
            log.warning("optimize_for_inference: calibration given but int8 backend %r is not installed (%s)",
                        backend, INSTALL_HINT)  # fmt: skip
        else:
            candidates.append("int8")
    if device.type == "cpu" and cpu_has_native_bf16():
        candidates.append("bf16")
    return candidates


@functools.cache
def _check_input(device: str) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=generator).to(device)


def _faithful(reference: nn.Module, candidate: nn.Module, x: Tensor | None = None) -> tuple[bool, float]:
    """Logit cosine >= 0.999 and the same top-1 on ``x``, by default a small random batch (64x64, batch 2: cheap).

    Top-1 must agree wherever the reference's top two logits differ by more than 5% of the
    logits' spread; a flip between near-equal logits is rounding, not a change of answer.
    """
    x = _check_input(str(_device_of(reference))) if x is None else x
    with torch.inference_mode():
        want, got = reference(x).double(), candidate(x).double()
    cosine = F.cosine_similarity(want, got, dim=1).min().item()
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.std(dim=1)
    same_top1 = bool((want.argmax(1) == got.argmax(1))[clear].all())
    return cosine >= MIN_COSINE and same_top1, cosine


class CompiledResNet(Described, nn.Module):
    """``torch.compile`` of an :class:`OptimizedResNet`, keeping its ``meta`` and ``precision``.

    Every batch size is one more compiled variant of the shared ``forward``; past dynamo's
    default limit of 8 it would silently fall back to eager, so calls raise the limit for
    their own duration only (``torch._dynamo.config.patch``), not for the whole process.
    """

    RECOMPILE_LIMIT = 64

    def __init__(self, module: OptimizedResNet, device: torch.device) -> None:
        super().__init__()
        self.meta = module.meta
        self.precision = module.precision
        # Freezing turns the weights into constants, so inductor can pre-pack them for oneDNN and
        # fuse bias + ReLU (+ add) into the convolutions; it is only valid without autograd.
        options = {"freezing": True} if device.type == "cpu" else {}
        self.compiled = torch.compile(module, options=options, dynamic=False)

    def forward(self, x: Tensor) -> Tensor:
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            return self.compiled(x)


def optimize_for_inference(
    model: ResNet,
    precision: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
    *,
    reuse_memory: bool = True,
    calibration: Calibration | None = None,
    int8_backend: str = "auto",
) -> nn.Module:
    """A new eval-mode module on ``model``'s device computing ``model``'s function, faster.

    ``precision``: ``"fp32"`` is exact (logits within 1e-3 of ``model``'s); ``"bf16"`` needs a
    CPU with native bf16 (AVX512-BF16/AMX) and ``"fp16"`` a CUDA device; ``"auto"`` picks the
    fastest of these for the device and keeps it only if it is faithful on a quick check
    (logit cosine >= 0.999 and the same top-1 as fp32 on a small random batch), else fp32.
    ``compile=True`` wraps the result in ``torch.compile``: the first call then takes tens of
    seconds (a minute or more for the 101-layer models on a small CPU) to compile, later calls
    run faster; call it under ``torch.inference_mode()`` (on CPU the weights are frozen into the
    compiled graph). A new input shape compiles again. ``model`` itself is not changed.

    ``"int8"`` (CPU; x86 with VNNI or AMX) needs ``calibration``: a preprocessed tensor batch, an
    iterable of batches, or image paths/URLs/PIL images (read by the project's loader, preprocessed
    with the model's preset); a few hundred representative images are best. ``"auto"`` tries int8
    first only when ``calibration`` is given, keeping it if faithful on (up to 16 of) those images.
    ``int8_backend``: ``"auto"`` (OpenVINO + NNCF where installed, else torchao), ``"openvino"`` or
    ``"torchao"`` (see :mod:`.quantize`); int8 is always compiled by its backend (``compile`` and
    ``channels_last`` do not apply) and takes CPU tensors.

    ``reuse_memory`` (CPU, Linux): call :func:`reuse_freed_memory`, a one-time switch for the
    whole process (glibc keeps freed memory for reuse: up to 2x faster large layers, at the
    cost of keeping the peak mapped). On CUDA, the result's ``forward`` lets cuDNN pick the
    fastest algorithm per shape (``cudnn.benchmark``) for its own calls only.

    The result keeps the model's ``meta`` (``architecture``, ``weights_record``, ``preprocessing``,
    ``classes``) and has a ``precision`` attribute; without ``compile`` it can be traced
    (``torch.jit.trace``, ``torch.onnx.export``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model, ResNet):
        raise TypeError(f"optimize_for_inference needs a models.ResNet, got {type(model).__name__}")
    device = _device_of(model)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 instructions: bf16 will be emulated and slower than fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' runs on CUDA only; on CPU use 'bf16' or 'fp32' (or 'auto')")
    batches = _calibration_for(model, precision, device, calibration, int8_backend)
    if device.type == "cpu" and reuse_memory:
        reuse_freed_memory()

    exact = OptimizedResNet(model, dtype=torch.float32, channels_last=channels_last)
    chosen: nn.Module = exact
    if precision == "auto":
        for name in _candidates(device, calibrated=batches is not None, backend=int8_backend):
            if name == "int8":
                candidate = _int8(model, exact, batches, int8_backend)
                ok, cosine = _faithful(exact, candidate, torch.cat(batches)[:16])
            else:
                candidate = OptimizedResNet(model, dtype=DTYPES[name], channels_last=channels_last)
                ok, cosine = _faithful(exact, candidate)
            if ok:
                chosen = candidate
                break
            log.info("optimize_for_inference: %s is not faithful here (cosine %.5f); trying the next", name, cosine)
    elif precision == "int8":
        return _int8(model, exact, batches, int8_backend)
    elif precision != "fp32":
        chosen = OptimizedResNet(model, dtype=DTYPES[precision], channels_last=channels_last)

    if isinstance(chosen, OptimizedResNet) and compile:
        return CompiledResNet(chosen, device)
    return chosen


def _calibration_for(
    model: ResNet, precision: str, device: torch.device, calibration: Calibration | None, backend: str
) -> list[Tensor] | None:
    """The calibration batches int8 would use (checked before any work), or None where int8 does not apply."""
    if precision not in ("int8", "auto"):
        if calibration is not None:
            raise ValueError(f"calibration applies to precision 'int8' (or 'auto'), not {precision!r}")
        return None
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision='int8' runs on the CPU only, the model is on {device}; move it with .cpu()")
        if calibration is None:
            raise ValueError(
                "precision='int8' needs calibration images: calibration=<paths, URLs, PIL images or a "
                "preprocessed (N, 3, H, W) batch>, a few hundred like the ones it will see"
            )
    if calibration is None or device.type != "cpu":
        return None
    from .quantize import calibration_batches, cpu_has_int8_dot, resolve_backend

    if precision == "int8":
        resolve_backend(backend)  # a missing dependency is an error before the images are read
        if not cpu_has_int8_dot():
            log.warning("this CPU has no int8 dot-product instructions (VNNI/AMX): int8 is emulated and slow")
    return calibration_batches(calibration, model.preprocessing)


def _int8(model: ResNet, exact: OptimizedResNet, batches: list[Tensor] | None, backend: str) -> nn.Module:
    from .quantize import quantize

    if batches is None:
        raise ValueError("precision='int8' needs calibration images")
    nchw = OptimizedResNet(model, dtype=torch.float32, channels_last=False)
    return quantize(exact, batches, backend=backend, exact_nchw=nchw)
