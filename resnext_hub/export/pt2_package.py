"""pt2 export: ``torch.export`` + AOTInductor, one package that runs without this repository.

The model's inference copy (:meth:`~resnext_hub.models.ResNet.optimize_for_inference`: BatchNorm
folded, channels-last, weights in the chosen precision) is exported with a dynamic batch axis,
compiled for one device by AOTInductor (on CPU with weight freezing) and packaged as ``.pt2`` (loadable from Python with
``torch._inductor.aoti_load_package`` or from C++ with ``torch::inductor::AOTIModelPackageLoader``).
The class names (and a multi-label head's thresholds) are in the archive's ``extra/labels.json``
(:mod:`.labels`).

Verification loads the package in a fresh Python process that cannot import this repository's
code (:func:`run_isolated`) and runs it on batches other than the traced one; its logits are held
to the rule of :mod:`.checks` against the eager fp32 model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import ResNet
from .checks import (
    TOLERANCES,
    TRACE_BATCH,
    VERIFY_BATCHES,
    Check,
    ExportError,
    ExportResult,
    compare,
    default_image_size,
    eager_copy,
    example_input,
    quiet,
    staged,
)
from .labels import add_to_pt2
from .onnx_file import EXPORTER_LOGGERS

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
ISOLATED_TIMEOUT_S = 600
# Inductor imports torch.utils.cpp_extension, which warns when it finds a CUDA toolkit (nvcc) but no CUDA
# runtime: nothing a CPU package needs, so it is silenced for CPU exports (at ERROR, for that block only).
CPU_SILENCED_LOGGERS = ("torch.utils.cpp_extension",)
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

# Run first in every isolated process: no path into this repository, and no `resnext_hub` from anywhere
# (an installed copy, an editable install's finder). argv[1] is the repository root.
_ISOLATION = r"""
import os, sys
_root = os.path.realpath(sys.argv.pop(1))
_env = os.path.realpath(sys.prefix) + os.sep  # a virtualenv inside the checkout (.venv) keeps its packages
_inside = lambda p, top: (os.path.realpath(p) + os.sep).startswith(top)  # noqa: E731
sys.path[:] = [p for p in sys.path if p and (_inside(p, _env) or not _inside(p, _root + os.sep))]

class _NoRepositoryCode:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "resnext_hub":
            raise ModuleNotFoundError(f"No module named {name!r} (this process runs without resnext-hub)", name=name)
        return None

sys.meta_path.insert(0, _NoRepositoryCode)
del _NoRepositoryCode
"""

# Loads a package and runs it on saved inputs: argv = package, device, input files (each written back as <file>.out).
_RUN_PACKAGE = r"""
import json, sys, time
import torch

package, device, *inputs = sys.argv[1:]
start = time.perf_counter()
compiled = torch._inductor.aoti_load_package(package)
load_s = time.perf_counter() - start
calls = []
with torch.inference_mode():
    for name in inputs:
        x = torch.load(name, weights_only=True).to(device)
        start = time.perf_counter()
        y = compiled(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
        torch.save(y.float().cpu(), name + ".out")
print(json.dumps({"load_s": load_s, "first_call_s": calls[0], "torch": torch.__version__}))
"""


def run_isolated(code: str, *args: str, timeout_s: float = ISOLATED_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that has no access to this repository's code.

    Isolated mode (``-I``: no ``PYTHONPATH``, user site or script folder on the path), a temporary
    working directory, no path entry inside the repository, and ``resnext_hub`` refused by name.
    """
    with tempfile.TemporaryDirectory(prefix="resnext-hub-isolated-") as cwd:
        argv = [sys.executable, "-I", "-c", _ISOLATION + code, str(REPOSITORY_ROOT), *args]
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)


def _run_package(path: Path, inputs: list[torch.Tensor], device: torch.device) -> tuple[list[np.ndarray], dict]:
    """Outputs of the package on ``inputs`` in an isolated process, and its load/first-call times."""
    with tempfile.TemporaryDirectory(prefix="resnext-hub-pt2-") as folder:
        names = []
        for i, x in enumerate(inputs):
            names.append(str(Path(folder) / f"input{i}.pt"))
            torch.save(x, names[-1])
        try:
            done = run_isolated(_RUN_PACKAGE, str(path.resolve()), str(device), *names)
        except subprocess.TimeoutExpired:
            raise ExportError(f"loading {path.name} in a fresh process took over {ISOLATED_TIMEOUT_S} s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ExportError(f"{path.name} could not be run in a fresh process: " + " | ".join(tail))
        outputs = [torch.load(name + ".out", weights_only=True).numpy() for name in names]
    return outputs, json.loads(done.stdout.strip().splitlines()[-1])


def _check_package(
    path: Path, model: nn.Module, image_size: int, precision: str, device: torch.device, batches: Sequence[int]
) -> tuple[list[Check], dict]:
    info: dict = {}

    def run_all(inputs: list[torch.Tensor]) -> list[np.ndarray]:
        outputs, found = _run_package(path, inputs, device)
        info.update(found)
        return outputs

    checks = compare(run_all, eager_copy(model), image_size, TOLERANCES[precision], batches, f"pt2 {path.name}")
    return checks, info


def verify_pt2(
    path: str | Path,
    model: nn.Module,
    *,
    image_size: int,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    batches: Sequence[int] = VERIFY_BATCHES,
) -> list[Check]:
    """Load ``path`` in a fresh process without this repository and compare its logits with ``model``'s."""
    return _check_package(Path(path), model, image_size, precision, torch.device(device), batches)[0]


def _inference_module(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """What is exported: a ResNet's inference copy in ``precision`` on ``device``; any other module as it is (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"pt2 precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a pt2 package for CUDA is compiled on a CUDA machine; this one has none (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"pt2 packages are compiled for cpu or cuda, not {device.type}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 pt2 packages are for CUDA (--device cuda); on a CPU use bf16 or fp32")
    local = eager_copy(model).to(device)
    if isinstance(local, ResNet):
        # reuse_memory=False: exporting must not change this process's allocator settings.
        return local.optimize_for_inference(precision, reuse_memory=False)
    if precision != "fp32":
        raise ValueError(f"{precision} pt2 exports need a resnext_hub ResNet (its optimize_for_inference)")
    return local


def export_pt2(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    verify_batches: Sequence[int] = VERIFY_BATCHES,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` as an AOTInductor package (``.pt2``): input ``(batch, 3, S, S)`` FP32 on ``device``,
    fp32 logits out, batch axis dynamic (1-4096). ``precision``: ``fp32``, ``bf16`` (CPUs with native
    bf16) or ``fp16`` (CUDA). Verified in a fresh process without this repository before it is moved
    into place (an existing file is replaced only with ``overwrite``); ``timings`` has ``export_s``,
    ``compile_s``, ``load_s`` (that process) and ``first_call_s``."""
    path = Path(path)
    size = image_size or default_image_size(model)
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"not a device: {device!r} ({error})") from None
    module = _inference_module(model, precision, device)
    timings = {}
    log.info("exporting pt2 (%s, %s) to %s; AOTInductor compiles for a minute or more", precision, device, path)
    with staged(path, f"pt2 export of {type(model).__name__}", overwrite=overwrite) as staging:
        cpu_only = quiet(CPU_SILENCED_LOGGERS, logging.ERROR) if device.type == "cpu" else contextlib.nullcontext()
        with warnings.catch_warnings(), quiet(EXPORTER_LOGGERS), cpu_only, torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            start = time.perf_counter()
            program = torch.export.export(
                module,
                (example_input(TRACE_BATCH, size, 0).to(device),),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            )
            timings["export_s"] = time.perf_counter() - start
            start = time.perf_counter()
            # Freezing on CPU lets inductor pre-pack the weights for oneDNN (measured: bf16 batch 16 1.5x faster).
            options = {"freezing": True} if device.type == "cpu" else {}
            # Packaged in memory, then written by Python: torch's own file writer aborts the process when a
            # write fails (a full disk); this way the write raises OSError. The package's folder is "archive".
            package = io.BytesIO()
            torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=options)
            add_to_pt2(package, model)  # the class names (and a multi-label head's thresholds) travel with it
            staging.write_bytes(package.getbuffer())
            timings["compile_s"] = time.perf_counter() - start
        checks, info = _check_package(staging, model, size, precision, device, verify_batches)
        timings.update({key: info[key] for key in ("load_s", "first_call_s")})
    return ExportResult("pt2", path, precision, size, checks, timings)
