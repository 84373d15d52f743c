"""``optimize_for_inference``: which fast copy of a model to build (precision, compile, int8), checked faithful.

The copies themselves are :mod:`.fused` (BN folded, fused SE, bf16/fp16, ``torch.compile``) and
:mod:`.quantize` (int8, calibrated on the caller's images); what the CPU can do comes from :mod:`.cpu`.
The rules here: ``"auto"`` tries the fastest precision the device has and keeps it only if it
gives the exact copy's answers on a quick check; explicit precisions are checked for the device.

:class:`Optimizable` gives :class:`~.resnet.ResNet` its ``optimize_for_inference`` method. It lives
here, and the model class composes it, so the modules import one way: ``resnet`` builds on this
module, and this module (with :mod:`.fused` and :mod:`.quantize`) reads the network through its
attributes (see :class:`~.fused.OptimizedResNet`), never by importing ``resnet``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune
from .cpu import cpu_has_int8_dot, cpu_has_native_bf16, reuse_freed_memory
from .fused import DTYPES, CompiledResNet, OptimizedResNet
from .head import HeadError, head_size
from .openvino_runtime import openvino_float
from .quantize import (
    INSTALL_HINT,
    Calibration,
    available_backends,
    calibration_batches,
    quantize,
    resolve_backend,
)

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# Faithfulness of a reduced-precision copy, checked by "auto" on a random input (see _faithful).
MIN_COSINE = 0.999


class Optimizable:
    """The ``optimize_for_inference`` method of a model class (composed by :class:`~.resnet.ResNet`).

    The optimizer reads the network's modules (see :class:`~.fused.OptimizedResNet`), its head
    ``fc`` and its ``preprocessing`` (for int8 calibration images).
    """

    fc: nn.Module

    def optimize_for_inference(
        self,
        precision: str = "auto",
        channels_last: bool = True,
        compile: bool = False,
        *,
        reuse_memory: bool = True,
        calibration: Calibration | None = None,
        int8_backend: str = "auto",
        batch_size: int | None = None,
        remeasure: bool = False,
    ) -> nn.Module:
        """A faster inference-only copy of this model (BN folded, channels-last, bf16/fp16/int8).

        ``precision``: ``"auto"`` (fastest faithful: int8 when ``calibration`` is given on CPUs
        with VNNI/AMX, else bf16 on CPUs with native bf16, fp16 on CUDA, else fp32), ``"fp32"``
        (exact), ``"bf16"``, ``"fp16"``, ``"int8"`` (needs ``calibration``: image paths/URLs/PIL
        images, or preprocessed batches; ``int8_backend`` ``"auto"``, ``"openvino"`` or ``"torchao"``).
        ``compile=True`` adds ``torch.compile`` (tens of seconds on the first call). This model is
        not changed; its head (``fc``, a replaced one included) is copied as it is. ``reuse_memory``:
        a one-time, process-wide glibc switch on Linux CPUs (see :func:`optimize_for_inference`).
        ``"auto"`` times its faithful candidates against fp32 once per machine and caches the choice
        (``batch_size``: 1 or batches, what it is timed for; ``remeasure=True`` times again; see :mod:`.autotune`).
        """
        return optimize_for_inference(
            self,
            precision=precision,
            channels_last=channels_last,
            compile=compile,
            reuse_memory=reuse_memory,
            calibration=calibration,
            int8_backend=int8_backend,
            batch_size=batch_size,
            remeasure=remeasure,
        )


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _candidates(
    device: torch.device, calibrated: bool, backend: str = "auto", classifier: bool = True, openvino: bool = False
) -> list[str]:
    """Reduced precisions worth trying on ``device``, fastest first (measured, see benchmarks/).

    int8 only with calibration data, for a classifier head, on a CPU with int8 dot products and a backend installed.
    ``openvino``: also OpenVINO's copies of the same graph where it is installed: ``"bf16+openvino"`` (CPUs with
    native bf16) and ``"fp32+openvino"`` (any CPU: the same fp32 function, OpenVINO's kernels and streams).
    """
    if device.type == "cuda":
        return ["fp16"]
    candidates = []
    if device.type == "cpu" and calibrated:
        if not classifier:
            log.info("optimize_for_inference: the head (fc) gives no classes: not trying int8")
        elif not cpu_has_int8_dot():
            log.info("optimize_for_inference: no int8 dot-product instructions (VNNI/AMX) on this CPU: not trying int8")
        elif not available_backends() or backend not in ("auto", *available_backends()):
            log.warning("optimize_for_inference: calibration given but int8 backend %r is not installed (%s)",
                        backend, INSTALL_HINT)  # fmt: skip
        else:
            candidates.append("int8")
    if device.type != "cpu":
        return candidates
    with_openvino = openvino and importlib.util.find_spec("openvino") is not None
    if cpu_has_native_bf16():
        candidates += ["bf16", "bf16+openvino"] if with_openvino else ["bf16"]
    if with_openvino:
        candidates.append("fp32+openvino")
    return candidates


def _in_channels(network: nn.Module) -> int:
    """As many channels as the network takes (timm's in_chans): its first convolution's."""
    return next(m.in_channels for m in network.modules() if isinstance(m, nn.Conv2d))


@functools.cache
def _check_input(device: str, channels: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, 64, 64, generator=generator).to(device)


def _faithful(reference: nn.Module, candidate: nn.Module, x: Tensor | None = None) -> tuple[bool, float]:
    """Output cosine >= 0.999 and the same top-1 on ``x``, by default a small random batch (64x64, batch 2: cheap).

    Top-1 must agree wherever the reference's top two outputs differ by more than 5% of the
    outputs' spread; a flip between near-equal logits is rounding, not a change of answer.
    A single output (a one-class head) has no top-1 to compare.
    """
    if x is None:
        x = _check_input(str(_device_of(reference)), _in_channels(reference))
    with torch.inference_mode():
        want, got = reference(x).double(), candidate(x).double()
    cosine = F.cosine_similarity(want, got, dim=1).min().item()
    if want.shape[1] < 2:
        return cosine >= MIN_COSINE, cosine
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.std(dim=1)
    same_top1 = bool((want.argmax(1) == got.argmax(1))[clear].all())
    return cosine >= MIN_COSINE and same_top1, cosine


def optimize_for_inference(
    model: Optimizable,
    precision: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
    *,
    reuse_memory: bool = True,
    calibration: Calibration | None = None,
    int8_backend: str = "auto",
    batch_size: int | None = None,
    remeasure: bool = False,
) -> nn.Module:
    """A new eval-mode module on ``model``'s device computing ``model``'s function, faster.

    ``precision``: ``"fp32"`` is exact (logits within 1e-3 of ``model``'s); ``"bf16"`` needs a
    CPU with native bf16 (AVX512-BF16/AMX) and ``"fp16"`` a CUDA device; ``"auto"`` picks the
    fastest of these for the device and keeps it only if it is faithful on a quick check
    (logit cosine >= 0.999 and the same top-1 as fp32 on a small random batch), else fp32.
    "Fastest" is measured (:mod:`.autotune`): the faithful candidates (where OpenVINO is installed and
    ``compile`` is off, also OpenVINO's fp32 copy of the same graph, and its bf16 copy on CPUs with native bf16) are
    timed against fp32 for about 1.5 s at ``batch_size`` (1, or batches: None), and one is kept only
    if it is at least 5% faster than fp32; the choice is cached per machine, architecture and batch
    regime (``remeasure=True`` or ``RESNEXT_HUB_AUTO_REMEASURE=1`` measures again).
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
    ``channels_last`` do not apply) and takes CPU tensors. int8 quantizes classifiers: a head
    that gives no classes (``model.fc = nn.Identity()``) is a :class:`~.head.HeadError`.

    ``reuse_memory`` (CPU, Linux): call :func:`~.cpu.reuse_freed_memory`, a one-time switch for the
    whole process (glibc keeps freed memory for reuse: up to 2x faster large layers, at the
    cost of keeping the peak mapped). On CUDA, the result's ``forward`` lets cuDNN pick the
    fastest algorithm per shape (``cudnn.benchmark``) for its own calls only.

    The result keeps the model's ``meta`` (``architecture``, ``weights_record``, ``preprocessing``,
    ``classes``) and head (``fc``, copied as it is) and has a ``precision`` attribute; without
    ``compile`` it can be traced (``torch.jit.trace``, ``torch.onnx.export``), unless ``"auto"`` chose
    OpenVINO (``backend == "openvino"``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model, Optimizable):
        raise TypeError(f"optimize_for_inference needs a models.ResNet, got {type(model).__name__}")
    device = _device_of(model)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 instructions: bf16 will be emulated and slower than fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' runs on CUDA only; on CPU use 'bf16' or 'fp32' (or 'auto')")
    classifier = bool(head_size(model.fc))
    if precision == "int8" and not classifier:
        raise HeadError(
            f"precision='int8' quantizes classifiers, and model.fc is {type(model.fc).__name__}, which gives "
            "no class count (see model.num_classes); use precision 'fp32' or 'bf16' for this head, or give the "
            "model a classifier head (an nn.Linear) before quantizing"
        )
    batches = _calibration_for(model, precision, device, calibration, int8_backend)
    if device.type == "cpu" and reuse_memory:
        reuse_freed_memory()

    exact = OptimizedResNet(model, dtype=torch.float32, channels_last=channels_last)
    chosen: nn.Module = exact
    if precision == "auto":
        chosen = _auto(model, exact, batches, int8_backend, classifier, channels_last, compile, batch_size, remeasure)
    elif precision == "int8":
        return _int8(model, exact, batches, int8_backend)
    elif precision != "fp32":
        chosen = OptimizedResNet(model, dtype=DTYPES[precision], channels_last=channels_last)

    if isinstance(chosen, OptimizedResNet) and compile:
        return CompiledResNet(chosen, device)
    return chosen


def _auto(
    model: Optimizable,
    exact: OptimizedResNet,
    batches: list[Tensor] | None,
    backend: str,
    classifier: bool,
    channels_last: bool,
    compile: bool,
    batch_size: int | None,
    remeasure: bool,
) -> nn.Module:
    """``"auto"``: the faithful candidates, timed against ``exact`` (or the cached choice); see :mod:`.autotune`."""
    device = _device_of(model)
    measuring = autotune.measuring()
    names = _candidates(device, batches is not None, backend, classifier, openvino=measuring and not compile)
    if not names:
        return exact
    key = autotune.choice_key(getattr(model, "architecture", None), autotune.regime(batch_size), device.type, names)
    cached = None
    if measuring and not (remeasure or autotune.remeasure_requested()):
        cached = autotune.cached_choice(key)
    if cached is not None:
        log.info("optimize_for_inference: auto uses the cached choice %s (%s)", cached, autotune.choice_file())
        if cached not in names:
            return exact
        names = [cached]
    faithful: dict[str, nn.Module] = {}
    for name in names:
        if name == "int8":
            candidate = _int8(model, exact, batches, backend)
            ok, cosine = _faithful(exact, candidate, torch.cat(batches)[:16])
        elif name.endswith("+openvino"):
            nchw = OptimizedResNet(model, dtype=torch.float32, channels_last=False)
            precision = name.partition("+")[0]
            try:
                candidate = openvino_float(nchw, _check_input("cpu", _in_channels(exact)), precision)
            except RuntimeError as error:  # the plugin may refuse bf16 where its kernels lack it (a limited ISA)
                log.info("optimize_for_inference: OpenVINO %s could not be built here (%s)", precision,
                         str(error)[-200:])  # fmt: skip
                continue
            ok, cosine = _faithful(exact, candidate)
        else:
            candidate = OptimizedResNet(model, dtype=DTYPES[name], channels_last=channels_last)
            ok, cosine = _faithful(exact, candidate)
        if ok:
            faithful[name] = candidate
            if not measuring or cached is not None:
                return candidate
        else:
            log.info("optimize_for_inference: %s is not faithful here (cosine %.5f); trying the next", name, cosine)
    if not faithful or cached is not None:
        return exact
    size = tuple(batches[0].shape[2:]) if batches else (model.preprocessing.crop_size,) * 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(autotune.REGIME_BATCH[autotune.regime(batch_size)], _in_channels(exact), *size, generator=generator)
    times = autotune.measure({"fp32": exact, **faithful}, x.to(device))
    choice = autotune.decide(times)
    ratios = autotune.paired_ratios(times)
    log.info("optimize_for_inference: auto measured time vs fp32 %s: %s", ratios, choice)
    autotune.record_choice(key, choice, ratios)
    return faithful.get(choice, exact)


def _calibration_for(
    model: Optimizable, precision: str, device: torch.device, calibration: Calibration | None, backend: str
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
    if precision == "int8":
        resolve_backend(backend)  # a missing dependency is an error before the images are read
        if not cpu_has_int8_dot():
            log.warning("this CPU has no int8 dot-product instructions (VNNI/AMX): int8 is emulated and slow")
    return calibration_batches(calibration, model.preprocessing)


def _int8(model: Optimizable, exact: OptimizedResNet, batches: list[Tensor] | None, backend: str) -> nn.Module:
    if batches is None:
        raise ValueError("precision='int8' needs calibration images")
    nchw = OptimizedResNet(model, dtype=torch.float32, channels_last=False)
    return quantize(exact, batches, backend=backend, exact_nchw=nchw)
