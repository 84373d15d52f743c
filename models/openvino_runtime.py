"""Our graph run by OpenVINO's CPU plugin: converting it, compiling and running it, and its float copies.

:func:`openvino_graph` converts a float NCHW copy (:class:`~.fused.OptimizedResNet`, SE layers as 1x1
convolutions, which OpenVINO runs faster) through ``torch.export`` for any batch and image size; the
int8 path (:mod:`.quantize`) quantizes that graph with NNCF and ``export --format openvino`` saves it.
:class:`OpenVINORunner` compiles a graph once per configuration: a latency-tuned request for batch 1,
throughput streams (the batch split over one request per stream) for larger batches.
:func:`openvino_float` is the float copy ``auto`` can pick (bf16 on CPUs with native bf16, fp32
anywhere): the converted graph is saved per set of weights under :func:`float_graph_cache`, so only
the first process converts. Needs ``openvino`` (imported here only when called).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..processing.atomic import install_folders, staging_folder
from .backend import BackendResNet
from .fused import FusedBottleneck, OptimizedResNet

log = logging.getLogger(__name__)

GRAPH_FORMAT = "g2"  # the converted float graph's layout (SE pooled early, as convolutions): bump when it changes
FLOAT_GRAPHS_KEPT = 4  # converted float graphs kept in float_graph_cache(), the most recently written


def example_batch(batches: list[Tensor]) -> Tensor:
    """A batch of 2 to export with: export specializes a dimension it sees as 0 or 1."""
    return torch.cat([batches[0], batches[0]])[:2]


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


class _EarlyPooledBottleneck(nn.Module):
    """A :class:`~.fused.FusedBottleneck` whose SE pools ``conv3``'s input instead of its output: the same function.

    ``conv3`` (BN folded) is affine per pixel, so the mean of its output is ``conv3`` of the mean of its input,
    and ``se_fc1 . conv3`` is one linear layer (``W1 W3``, ``W1 b3 + b1``). The pooling then reads the narrower
    activation (half the channels), and the gate no longer waits for ``conv3``. Measured with OpenVINO on
    SE-ResNeXt101-32x4d, batch 16 (AMD Zen 4): 1.5% (bf16) and 2% (fp32) faster, median of paired rounds.
    """

    def __init__(self, block: FusedBottleneck) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = block.conv1, block.conv2, block.conv3, block.downsample
        self.se_fc2 = block.se_fc2
        w3 = block.conv3.weight.detach().flatten(1)  # (out, mid)
        b3 = block.conv3.bias.detach()
        w1, b1 = block.se_fc1.weight.detach(), block.se_fc1.bias.detach()
        self.se_fc1 = nn.Linear(w3.shape[1], w1.shape[0]).to(w3.dtype)
        with torch.no_grad():  # in float64: the product's rounding, once
            self.se_fc1.weight.copy_(w1.double() @ w3.double())
            self.se_fc1.bias.copy_(w1.double() @ b3.double() + b1.double())
        self.se_fc1.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        mid = F.relu(self.conv2(F.relu(self.conv1(x))))
        gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(mid.mean((2, 3))))))
        return F.relu(torch.addcmul(shortcut, self.conv3(mid), gate[:, :, None, None]))


def _pool_early(model: nn.Module) -> nn.Module:
    """``model`` with every fused SE bottleneck as :class:`_EarlyPooledBottleneck`, in place."""
    for stage in getattr(model, "stages", ()):
        for index, block in enumerate(stage):
            if isinstance(block, FusedBottleneck) and block.se_fc1 is not None:
                stage[index] = _EarlyPooledBottleneck(block)
    return model


def _se_as_convs(model: nn.Module) -> nn.Module:
    """``model`` with every fused SE block's layers as :class:`_PooledConv`, in place."""
    for module in model.modules():
        for name in ("se_fc1", "se_fc2"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                setattr(module, name, _PooledConv(layer))
    return model


def openvino_graph(model: nn.Module, example: Tensor, *, pool_se_early: bool = True) -> Any:
    """``model`` (a float NCHW copy, changed in place: its SE layers as 1x1 convolutions, and with ``pool_se_early``
    SE pooled before ``conv3``) as an OpenVINO ``ov.Model`` taking any batch and image size; ``example``: a batch
    of 2 or more to export with. The int8 graph pools late: NNCF then quantizes ``conv3``'s output and the gate
    multiply runs on int8 (early, it stayed bf16: 11% slower on an Intel Xeon with AMX, one stream, batch 8)."""
    ov = importlib.import_module("openvino")
    model = _se_as_convs(_pool_early(model) if pool_se_early else model)
    # From torch.export (any batch and image size): 3x faster than the converter's own torch.jit trace.
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(dims,), strict=False)
    return ov.convert_model(program)


def openvino_float(exact_nchw: OptimizedResNet, example: Tensor, precision: str = "bf16") -> BackendResNet:
    """``exact_nchw`` (the fp32 NCHW copy, changed in place) run by OpenVINO's CPU plugin in ``precision``.

    ``"bf16"`` (CPUs with native bf16) or ``"fp32"``; the same graph and scheduling as the int8 copy
    (SE layers as convolutions, batches split over throughput streams), without quantizing. ``example``:
    a preprocessed batch (its size does not bind the result). Needs ``openvino``.
    """
    if importlib.util.find_spec("openvino") is None:
        raise ImportError("the OpenVINO float backend needs openvino, which is not installed: pip install openvino")
    hint = {"bf16": "bf16", "fp32": "f32"}[precision]
    with torch.no_grad():
        converted = _cached_float_graph(exact_nchw, example_batch([example]))
    run = OpenVINORunner(converted, {"INFERENCE_PRECISION_HINT": hint})
    first_conv = exact_nchw.first_conv
    return BackendResNet(exact_nchw.meta, "openvino", run, None, first_conv=first_conv, precision=precision)


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
