"""Post-training static int8 quantization of a ResNet for x86 CPUs (VNNI or AMX), calibrated on the user's images.

Reached through ``model.optimize_for_inference(precision="int8", calibration=...)``: the exact fp32 copy
(:class:`~.fused.OptimizedResNet`, BN folded, fused SE) is quantized with per-channel symmetric int8
weights and per-tensor activations whose ranges come from the calibration images. Two backends, both
optional dependencies (``pip install 'resnext-hub[int8]'``) imported only here, only when asked:

- ``"openvino"`` (the default where installed; measured the faster, see benchmarks/README.md):
  ``torch.export`` (SE layers as 1x1 convolutions, which OpenVINO runs faster), OpenVINO's converter,
  NNCF's ``quantize`` (fast bias correction; the classifier left in float), the CPU plugin. Batches of 2 and
  more are split over the plugin's throughput streams (one request per stream, each stream its own
  cores), measured faster at batch 16 than one request on every core; batch 1 runs on a latency-tuned
  copy that uses every core.
- ``"torchao"``: PT2E (``torch.export`` with a dynamic batch, ``prepare_pt2e``/``convert_pt2e`` with
  ``X86InductorQuantizer``), compiled by inductor with frozen weights into oneDNN int8 kernels. The first
  call per batch size compiles (tens of seconds to minutes); the image size is fixed by the calibration.

Either way the result is called like the float copies (a float ``(N, 3, H, W)`` CPU tensor in, fp32
logits out), keeps the model's ``meta`` and says ``precision == "int8"``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..processing import load_image
from ..processing.presets import ImageClassification
from .backend import BackendResNet
from .fused import OptimizedResNet, PointwiseConv
from .openvino_runtime import OpenVINORunner, example_batch, openvino_graph

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "torchao")
INSTALL_HINT = "pip install 'resnext-hub[int8]' (OpenVINO + NNCF, the default), or 'resnext-hub[torchao]' (torchao)"
CALIBRATION_BATCH = 16

CalibrationItem = str | Path | Image.Image | Tensor
Calibration = CalibrationItem | Iterable[CalibrationItem]


def available_backends() -> list[str]:
    """The int8 backends importable here, the faster first (OpenVINO, measured; see the module docstring)."""
    found = []
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        found.append("openvino")
    if importlib.util.find_spec("torchao"):
        found.append("torchao")
    return found


def resolve_backend(backend: str) -> str:
    """``backend`` itself, or for ``"auto"`` the fastest installed; a clear ImportError if none is."""
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend must be one of {BACKENDS}, got {backend!r}")
    found = available_backends()
    if backend == "auto":
        if not found:
            raise ImportError(f"precision='int8' needs a quantization backend, and none is installed: {INSTALL_HINT}")
        return found[0]
    if backend not in found:
        needs = "openvino and nncf" if backend == "openvino" else "torchao"
        raise ImportError(f"int8 backend {backend!r} needs {needs}, which is not installed: {INSTALL_HINT}")
    return backend


# -- calibration data --------------------------------------------------------------------------------


def _as_batch(tensor: Tensor, what: str) -> Tensor:
    if tensor.dim() == 3:
        tensor = tensor[None]
    if tensor.dim() != 4 or tensor.shape[1] != 3 or tensor.shape[0] == 0:
        raise ValueError(
            f"{what}: expected a preprocessed image (3, H, W) or batch (N, 3, H, W), got shape {tuple(tensor.shape)}; "
            "pass image paths, URLs or PIL images to have them preprocessed as the model expects"
        )
    if not tensor.is_floating_point():
        raise ValueError(f"{what}: expected a float tensor (preprocessed, normalized), got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return tensor.detach().float().cpu().contiguous()


def calibration_batches(
    calibration: Calibration, preprocessing: ImageClassification, *, batch_size: int = CALIBRATION_BATCH
) -> list[Tensor]:
    """The calibration data as float CPU batches ``(n, 3, H, W)`` of one image size.

    ``calibration``: a preprocessed tensor (one image or a batch), an iterable of such tensors, or
    image paths / URLs / ``PIL.Image`` objects (one, or an iterable), which are read by the project's
    loader and go through ``preprocessing`` (the model's own preset), ``batch_size`` to a batch.
    """
    if isinstance(calibration, (Tensor, str, Path, Image.Image)):
        items: list[Any] = [calibration]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
    else:
        raise TypeError(
            "calibration must be a tensor batch, an iterable of batches, or image paths/URLs/PIL images; "
            f"got {type(calibration).__name__}"
        )
    if not items:
        raise ValueError("calibration is empty: give at least one image (a few hundred representative ones is best)")
    batches: list[Tensor] = []
    pending: list[Tensor] = []
    for index, item in enumerate(items):
        if isinstance(item, Tensor):
            batches.append(_as_batch(item, f"calibration item {index}"))
        elif isinstance(item, (str, Path, Image.Image)):
            pending.append(preprocessing(load_image(item)))  # InvalidImageError names the bad input
        else:
            raise TypeError(
                f"calibration item {index}: expected a tensor, an image path or URL, or a PIL.Image; "
                f"got {type(item).__name__}"
            )
    batches += [torch.stack(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    sizes = sorted({tuple(batch.shape[2:]) for batch in batches})
    if len(sizes) > 1:
        raise ValueError(f"calibration images must all have one size (H, W), got {sizes}")
    return batches


# -- quantizing --------------------------------------------------------------------------------------


def quantize(
    exact: OptimizedResNet, batches: list[Tensor], *, backend: str = "auto", exact_nchw: nn.Module | None = None
) -> BackendResNet:
    """An int8 :class:`BackendResNet` of ``exact`` (the fp32 copy), calibrated on ``batches``.

    ``exact_nchw``: the same fp32 copy without channels-last (what OpenVINO converts best); default ``exact``.
    """
    backend = resolve_backend(backend)
    with torch.no_grad():
        if backend == "openvino":
            run = _openvino(exact_nchw or exact, batches)
            return BackendResNet(exact.meta, backend, run, None, first_conv=exact.first_conv)
        run = _torchao(exact, batches)
    return BackendResNet(exact.meta, backend, run, tuple(batches[0].shape[2:]), first_conv=exact.first_conv)


# -- OpenVINO + NNCF ----------------------------------------------------------------------------------


def _openvino(model: nn.Module, batches: list[Tensor]) -> OpenVINORunner:
    nncf = importlib.import_module("nncf")
    nncf.set_log_level(logging.ERROR)  # its INFO lines are not the caller's business
    converted = openvino_graph(model, example_batch(batches), pool_se_early=False)
    # One image per item: NNCF's statistics (and its bias correction) assume batch 1.
    images = [image[None].numpy() for batch in batches for image in batch]
    # The classifier stays in float: int8 saves nothing there and costs accuracy. NNCF draws
    # progress bars on stdout, which may be a command's JSON output: they go to stderr.
    float_matmuls = nncf.IgnoredScope(types=["MatMul"], validate=False)
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(converted, nncf.Dataset(images), subset_size=len(images), ignored_scope=float_matmuls)
    return OpenVINORunner(quantized)


# -- torchao PT2E + inductor --------------------------------------------------------------------------


def _plain_convs(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`PointwiseConv` as a plain ``nn.Conv2d`` (shared weights), in place.

    X86InductorQuantizer finds convolutions by their source module type: a subclass is left in fp32.
    """
    for name, child in module.named_children():
        if isinstance(child, PointwiseConv):
            conv = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            conv.weight, conv.bias = child.weight, child.bias
            setattr(module, name, conv)
        else:
            _plain_convs(child)
    return module


class _CompiledInt8:
    """``torch.compile`` of the converted PT2E graph, one variant per batch size (as CompiledResNet)."""

    RECOMPILE_LIMIT = 64

    def __init__(self, graph: nn.Module) -> None:
        self._compiled = torch.compile(graph, dynamic=False)

    def __call__(self, x: Tensor) -> Tensor:
        # Freezing set for the call (compiling happens in the first one), not as a compile option:
        # inductor's int8 weight-packing pass reads the global config.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                return self._compiled(x).float()


def _torchao(exact: OptimizedResNet, batches: list[Tensor]) -> _CompiledInt8:
    pt2e = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
    x86 = importlib.import_module("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    model = _plain_convs(copy.deepcopy(exact))
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model, (example_batch(batches),), dynamic_shapes=({0: batch},), strict=False).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(graph, quantizer)
    for calibration_batch in batches:
        prepared(calibration_batch)
    return _CompiledInt8(pt2e.convert_pt2e(prepared))
