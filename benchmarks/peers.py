"""The other runtimes a user of NVIDIA's model would reach for, set up the way their documentation says.

``ort-fp32`` / ``ort-int8``: NVIDIA's model (the plain one) exported with ``torch.onnx.export``
(dynamic batch), run by ONNX Runtime's CPU provider with default session options; int8 is
``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, ``reduce_range`` where the CPU lacks
VNNI, as ORT's guide says) on the calibration batch. ``ov-fp32`` / ``ov-bf16`` / ``ov-int8``: the plain
model through ``openvino.convert_model`` (its default torch path), int8 by ``nncf.quantize`` with defaults
on the same calibration images (one per item), compiled for the CPU with ``INFERENCE_PRECISION_HINT``
f32 / bf16 / the default (OpenVINO's default on CPUs with native bf16 is bf16 for the float parts),
in OpenVINO's two best configurations: the latency hint (one request on every core), and with
``+streams`` the throughput hint with the batch split across its streams' requests (the scheduling
our OpenVINO copies use, ``models/openvino_runtime.py``'s runner, reused here). Each is
an ``nn.Module`` taking a torch batch and giving fp32 logits, so the benchmark times them like ours.
Missing packages raise :class:`PeerUnavailable` (the benchmark skips the mode with a note).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnext_hub.models.cpu import cpu_has_int8_dot

_OV = ("ov-fp32", "ov-bf16", "ov-int8")
PEERS = ("ort-fp32", "ort-int8", *_OV, *(f"{mode}+streams" for mode in _OV))
_OV_HINTS = {"fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "bf16": {"INFERENCE_PRECISION_HINT": "bf16"}, "int8": {}}
NEEDS = {"ort": ("onnxruntime", "onnx", "onnxscript"), "ov": ("openvino", "nncf")}


class PeerUnavailable(RuntimeError):
    """The runtime of a peer mode is not installed."""


class Peer(nn.Module):
    """A runtime's callable behind the benchmark's interface: a torch batch in, fp32 logits out."""

    def __init__(self, run: Any, precision: str, handle: Any = None) -> None:
        super().__init__()
        self._run = run
        self.precision = precision
        self.handle = handle  # the runtime's model (for profiling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._run(x.contiguous().numpy())))


def load_peer(mode: str, plain: nn.Module, size: int, calibration: torch.Tensor, workdir: Path) -> Peer:
    """The peer ``mode`` of ``plain`` (NVIDIA's model, eval, CPU); ``calibration`` a preprocessed batch."""
    mode, _, config = mode.partition("+")
    runtime, _, precision = mode.partition("-")
    missing = [name for name in NEEDS[runtime] if importlib.util.find_spec(name) is None]
    if missing:
        raise PeerUnavailable(f"{mode} needs {', '.join(missing)} (pip install {' '.join(missing)})")
    if runtime == "ort":
        return _onnx_runtime(plain, size, precision, calibration, workdir)
    return _openvino(plain, size, precision, calibration, streams=config == "streams")


def _onnx_runtime(plain: nn.Module, size: int, precision: str, calibration: torch.Tensor, workdir: Path) -> Peer:
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = workdir / "plain.onnx"
    if not path.exists():
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                plain,
                (torch.randn(2, 3, size, size),),
                input_names=["input"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                dynamo=True,
            )
        program.save(str(path))
    if precision == "int8":
        prepared, quantized = workdir / "plain-prepared.onnx", workdir / "plain-int8.onnx"
        quant_pre_process(str(path), str(prepared))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([calibration.numpy()])

            def get_next(self) -> dict | None:
                batch = next(self.batches, None)
                return None if batch is None else {"input": batch}

        quantize_static(
            str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=not cpu_has_int8_dot(),
        )  # fmt: skip
        path = quantized
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Peer(lambda x: session.run(None, {"input": x})[0], precision, session)


_CONVERTED: dict[tuple[Any, int, str], Any] = {}  # (model id, size, precision): one conversion per run


def _openvino(plain: nn.Module, size: int, precision: str, calibration: torch.Tensor, *, streams: bool) -> Peer:
    import openvino as ov

    from resnext_hub.models.openvino_runtime import OpenVINORunner

    key = (getattr(plain, "architecture", None) or id(plain), size, "int8" if precision == "int8" else "float")
    if key not in _CONVERTED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(plain, example_input=torch.randn(1, 3, size, size))
        if precision == "int8":
            import nncf

            with contextlib.redirect_stdout(sys.stderr):
                model = nncf.quantize(model, nncf.Dataset([image[None].numpy() for image in calibration]))
        _CONVERTED[key] = model
    model = _CONVERTED[key]
    runner = OpenVINORunner(model, _OV_HINTS[precision], split=streams)
    return Peer(lambda x: runner(torch.from_numpy(x)).numpy(), precision, model)


def openvino_profile(model: Any, x: torch.Tensor, rows: int = 15) -> str:
    """OpenVINO's per-node counters for one call on ``x`` (latency-tuned, every core), summed by layer type."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer({0: x.numpy()})  # warm-up: first-call allocations
    request.infer({0: x.numpy()})
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            key = (info.node_type, info.exec_type)
            totals[key][0] += info.real_time.total_seconds() * 1000
            totals[key][1] += 1
    total = sum(ms for ms, _ in totals.values())
    lines = [f"OpenVINO counters, batch {len(x)}: {total:.1f} ms in executed nodes (type, kernel, ms, share, calls)"]
    for (node, kernel), (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {node:18} {kernel:32} {ms:8.1f} ms  {100 * ms / total:5.1f}%  x{calls}")
    return "\n".join(lines)


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="resnext-bench-peers-")
