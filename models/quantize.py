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
import hashlib
import importlib
import importlib.util
import logging
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..processing import load_image
from ..processing.atomic import install_folders, staging_folder
from ..processing.presets import ImageClassification
from .fused import OptimizedResNet, PointwiseConv
from .meta import Described

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "torchao")
INSTALL_HINT = "pip install 'resnext-hub[int8]' (OpenVINO + NNCF, the default), or 'resnext-hub[torchao]' (torchao)"
CALIBRATION_BATCH = 16
GRAPH_FORMAT = "g1"  # the converted float graph's layout (SE layers as convolutions): bump when openvino_graph changes
FLOAT_GRAPHS_KEPT = 4  # converted float graphs kept in float_graph_cache(), the most recently written

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


# -- the quantized module -----------------------------------------------------------------------------


class QuantizedResNet(Described, nn.Module):
    """An int8 copy of a ResNet run by ``backend``: a float ``(N, 3, H, W)`` CPU tensor in, fp32 logits out.

    ``image_size``: the one ``(H, W)`` it accepts, or None (any size >= 32). ``precision``: what it
    computes in ("int8"; "bf16" for OpenVINO's float copy, :func:`openvino_float`).
    """

    def __init__(
        self,
        meta: Any,
        backend: str,
        run: Callable[[Tensor], Tensor],
        image_size: tuple[int, int] | None,
        *,
        first_conv: str = "conv1",
        precision: str = "int8",
    ) -> None:
        super().__init__()
        self.precision = precision
        self.meta = meta
        self.first_conv = first_conv
        self.backend = backend
        self.image_size = image_size
        self._run = run
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ValueError(
                f"the {self.precision} model ({self.backend}) runs on the CPU; got a tensor on {x.device} "
                "(move it with .cpu())"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        if self.image_size is not None and tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"this {self.precision} model ({self.backend}) was built for "
                f"{self.image_size[0]}x{self.image_size[1]} images "
                f"(the calibration size), got {x.shape[2]}x{x.shape[3]}; calibrate at the size you run"
            )
        return self._run(x.detach().float())

    @property
    def backend_model(self) -> Any:
        """The backend's own model: OpenVINO's int8 ``ov.Model``, or torchao's compiled callable (diagnostics)."""
        return getattr(self._run, "model", self._run)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, image_size={self.image_size}"


def quantize(
    exact: OptimizedResNet, batches: list[Tensor], *, backend: str = "auto", exact_nchw: nn.Module | None = None
) -> QuantizedResNet:
    """An int8 :class:`QuantizedResNet` of ``exact`` (the fp32 copy), calibrated on ``batches``.

    ``exact_nchw``: the same fp32 copy without channels-last (what OpenVINO converts best); default ``exact``.
    """
    backend = resolve_backend(backend)
    with torch.no_grad():
        if backend == "openvino":
            run = _openvino(exact_nchw or exact, batches)
            return QuantizedResNet(exact.meta, backend, run, None, first_conv=exact.first_conv)
        run = _torchao(exact, batches)
    return QuantizedResNet(exact.meta, backend, run, tuple(batches[0].shape[2:]), first_conv=exact.first_conv)


def _example(batches: list[Tensor]) -> Tensor:
    """A batch of 2 to export with: export specializes a dimension it sees as 0 or 1."""
    return torch.cat([batches[0], batches[0]])[:2]


# -- OpenVINO + NNCF ----------------------------------------------------------------------------------


class OpenVINORunner:
    """OpenVINO compiled copies of one model: latency-tuned (batch 1) and throughput streams (batch > 1).

    ``config``: more CPU plugin properties for both (``INFERENCE_PRECISION_HINT``: a saved IR's, or the float
    backend's); ``split=False`` runs every batch as one latency-tuned request on every core (no streams). One
    lock: OpenVINO's infer requests are not reentrant, and the engine may call from several threads.
    """

    def __init__(self, model: Any, config: dict[str, Any] | None = None, *, split: bool = True) -> None:
        import openvino as ov

        self._core = ov.Core()
        self.model = model
        self.config = dict(config or {})
        self._split_batches = split
        self._latency = self._core.compile_model(model, "CPU", {**self.config, "PERFORMANCE_HINT": "LATENCY"})
        self._request = self._latency.create_infer_request()
        self._queue: Any = None
        self._lock = threading.Lock()

    def _streams(self) -> Any:
        if self._queue is None:
            import openvino as ov

            compiled = self._core.compile_model(self.model, "CPU", {**self.config, "PERFORMANCE_HINT": "THROUGHPUT"})
            self._queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return self._queue

    def __call__(self, x: Tensor) -> Tensor:
        array = x.contiguous().numpy()
        with self._lock:
            if self._split_batches and len(array) > 1 and len(self._streams()) > 1:
                return self._split(array)
            return torch.from_numpy(self._request.infer({0: array})[0].copy())

    def _split(self, array: Any) -> Tensor:
        import numpy as np

        queue = self._streams()
        parts = np.array_split(array, min(len(array), len(queue)))
        outputs: list[Any] = [None] * len(parts)

        def done(request: Any, index: int) -> None:
            outputs[index] = request.get_output_tensor(0).data.copy()

        queue.set_callback(done)
        for index, part in enumerate(parts):
            queue.start_async({0: part}, index)
        queue.wait_all()
        return torch.from_numpy(np.concatenate(outputs))


class _PooledConv(nn.Module):
    """A ``Linear`` on the pooled ``(N, C)`` vector as a 1x1 convolution on ``(N, C, 1, 1)``: same function.

    OpenVINO runs the SE block's two layers far faster as convolutions than as matmuls (measured in
    its counters at batch 16: 2.4 ms against 58 ms for seresnext50's 32 layers).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
        self.conv.weight = nn.Parameter(linear.weight.detach()[:, :, None, None], requires_grad=False)
        self.conv.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x[:, :, None, None]).flatten(1)


def _se_as_convs(model: nn.Module) -> nn.Module:
    """``model`` with every fused SE block's layers as :class:`_PooledConv`, in place."""
    for module in model.modules():
        for name in ("se_fc1", "se_fc2"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                setattr(module, name, _PooledConv(layer))
    return model


def openvino_graph(model: nn.Module, example: Tensor) -> Any:
    """``model`` (a float NCHW copy, changed in place: SE layers as 1x1 convolutions) as an OpenVINO ``ov.Model``
    taking any batch and image size; ``example``: a batch of 2 or more to export with."""
    ov = importlib.import_module("openvino")
    model = _se_as_convs(model)
    # From torch.export (any batch and image size): 3x faster than the converter's own torch.jit trace.
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(dims,), strict=False)
    return ov.convert_model(program)


def openvino_float(exact_nchw: OptimizedResNet, example: Tensor, precision: str = "bf16") -> QuantizedResNet:
    """``exact_nchw`` (the fp32 NCHW copy, changed in place) run by OpenVINO's CPU plugin in ``precision``.

    ``"bf16"`` (CPUs with native bf16) or ``"fp32"``; the same graph and scheduling as the int8 copy
    (SE layers as convolutions, batches split over throughput streams), without quantizing. ``example``:
    a preprocessed batch (its size does not bind the result). Needs ``openvino``.
    """
    if importlib.util.find_spec("openvino") is None:
        raise ImportError("the OpenVINO float backend needs openvino, which is not installed: pip install openvino")
    hint = {"bf16": "bf16", "fp32": "f32"}[precision]
    with torch.no_grad():
        converted = _cached_float_graph(exact_nchw, _example([example]))
    run = OpenVINORunner(converted, {"INFERENCE_PRECISION_HINT": hint})
    first_conv = exact_nchw.first_conv
    return QuantizedResNet(exact_nchw.meta, "openvino", run, None, first_conv=first_conv, precision=precision)


def float_graph_cache() -> Path:
    """``<torch.hub.get_dir()>/resnext_hub/openvino``: converted float graphs, one folder per set of weights."""
    return Path(torch.hub.get_dir()) / "resnext_hub" / "openvino"


def weights_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s modules and state (each tensor's name, shape, dtype and bytes): what a converted graph
    is made of."""
    digest = hashlib.sha256(repr(model).encode())  # the structure too: the pooling, say, holds no weights
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _cached_float_graph(exact_nchw: nn.Module, example: Tensor) -> Any:
    """:func:`openvino_graph` of ``exact_nchw``, read from :func:`float_graph_cache` when these weights were
    converted before (a conversion takes seconds to minutes for the 101-layer nets; reading the saved graph,
    a fraction of a second), else converted and saved there for the next process. The cache keeps the
    :data:`FLOAT_GRAPHS_KEPT` most recently written graphs; a cache that cannot be written costs only time."""
    import openvino as ov

    folder = (
        float_graph_cache() / f"{weights_digest(exact_nchw)[:40]}-{GRAPH_FORMAT}-ov{ov.get_version().split('-')[0]}"
    )
    xml = folder / "model.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            return ov.Core().read_model(str(xml))
        except RuntimeError as error:  # a damaged entry: converted again, and replaced
            log.warning("the saved OpenVINO graph %s could not be read (%s): converting again", folder, error)
    converted = openvino_graph(exact_nchw, example)
    try:
        with staging_folder(folder) as staging:
            (staging / folder.name).mkdir()
            # fp32 weights as they are (OpenVINO would store fp16 by default): the graph must be the model's.
            ov.save_model(converted, str(staging / folder.name / "model.xml"), compress_to_fp16=False)
            install_folders(staging, folder.parent, [folder.name], replace=True)
        for old in sorted(folder.parent.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)[FLOAT_GRAPHS_KEPT:]:
            if old.is_dir() and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        log.warning(
            "could not save the converted OpenVINO graph in %s (%s): the next process converts again", folder, error
        )
    return converted


def _openvino(model: nn.Module, batches: list[Tensor]) -> OpenVINORunner:
    nncf = importlib.import_module("nncf")
    nncf.set_log_level(logging.ERROR)  # its INFO lines are not the caller's business
    converted = openvino_graph(model, _example(batches))
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
    graph = torch.export.export(model, (_example(batches),), dynamic_shapes=({0: batch},), strict=False).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(graph, quantizer)
    for calibration_batch in batches:
        prepared(calibration_batch)
    return _CompiledInt8(pt2e.convert_pt2e(prepared))
