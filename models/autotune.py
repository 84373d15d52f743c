"""``"auto"``'s choice by measurement: time the faithful candidates against fp32 once per machine, keep the fastest.

A CPU's feature flags say what it *can* do (:mod:`.cpu`), not what is fastest on it: an emulated or
poorly scheduled precision can be slower than fp32, and a flag can be present where its speed is not
(a VM that reports AVX512-BF16 on a host core shared with others). So ``optimize_for_inference("auto")``
builds the candidates that pass the faithfulness check, times each against the exact fp32 copy, and
keeps one only if it is faster than fp32 by :data:`MARGIN` in the median of *paired* rounds (each
round times every candidate back to back, in a rotating order, and a candidate's ratio is taken to
fp32's time in the same round): a neighbour process that slows the machine for a moment slows a
whole round, not one contender, which a best-of or a mean of separate runs cannot tell apart (see
benchmarks/README.md for the 0.50x once reported on a loaded AVX2 machine). Ties go to fp32.

The choice is cached per machine in a small JSON file, :func:`choice_file`, written atomically, keyed
by what decides it (:func:`choice_key`): the CPU model and flags, thread count, torch and OpenVINO
versions, the architecture, the batch regime (batch 1 or batches) and the candidate set. Set
``RESNEXT_HUB_AUTO_REMEASURE=1`` (or pass ``remeasure=True``) to measure again; set
``RESNEXT_HUB_AUTO_MEASURE=0`` to skip measuring (the first faithful candidate, in the static order
of :mod:`.optimize`, is kept; the test suite runs so, except the tests of this module).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..processing.atomic import write_atomic
from .cpu import cpu_flags

log = logging.getLogger(__name__)

MEASURE_ENV = "RESNEXT_HUB_AUTO_MEASURE"
REMEASURE_ENV = "RESNEXT_HUB_AUTO_REMEASURE"
# A reduced precision must beat fp32 by 5% in the median paired ratio: within that, fp32 (exact) wins.
MARGIN = 1.05
BUDGET_S = 1.5  # measuring time, after one warm-up call each
MIN_ROUNDS = 3
MAX_ROUNDS = 15
# The measured batch: batch 1, or 4 images for the "batch" regime (enough to use throughput streams).
REGIME_BATCH = {"single": 1, "batch": 4}
FILE_VERSION = 1


def measuring() -> bool:
    """False when ``RESNEXT_HUB_AUTO_MEASURE=0``: ``auto`` keeps the first faithful candidate."""
    return os.environ.get(MEASURE_ENV, "1").strip() != "0"


def remeasure_requested() -> bool:
    """True when ``RESNEXT_HUB_AUTO_REMEASURE=1``: a cached choice is measured again."""
    return os.environ.get(REMEASURE_ENV, "0").strip() not in ("", "0")


def choice_file() -> Path:
    """``<torch.hub.get_dir()>/resnext_hub/auto_precision.json`` (follows ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "resnext_hub" / "auto_precision.json"


def regime(batch_size: int | None) -> str:
    """``"single"`` for batch 1, ``"batch"`` otherwise (None: the engine's and benchmarks' batches)."""
    return "single" if batch_size == 1 else "batch"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def choice_key(architecture: str | None, batch_regime: str, device: str, candidates: Sequence[str]) -> str:
    """What the choice depends on, as one string: machine, libraries, network, batch regime, candidates."""
    flags = sorted(cpu_flags() or ())
    parts = {
        "cpu": _cpu_model(),
        "flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "openvino": _version("openvino"),
        "architecture": architecture,
        "regime": batch_regime,
        "device": device,
        "candidates": list(candidates),
    }
    return json.dumps(parts, sort_keys=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # unreadable or half-edited by hand: measured again, then rewritten
        log.warning("auto precision: ignoring %s (%s); it will be rewritten", path, error)
        return {}
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("choices"), dict):
        return {}
    return data


def cached_choice(key: str, path: Path | None = None) -> str | None:
    """The choice recorded for ``key``, or None."""
    entry = _read(path or choice_file()).get("choices", {}).get(key)
    return entry.get("choice") if isinstance(entry, dict) else None


def record_choice(key: str, choice: str, ratios: Mapping[str, float], path: Path | None = None) -> None:
    """Record ``choice`` (and the measured time ratios to fp32) for ``key``, replacing the file atomically.

    An unwritable cache only costs a measurement in the next process: it is logged, not raised.
    """
    path = path or choice_file()
    data = _read(path) or {"version": FILE_VERSION, "choices": {}}
    data["choices"][key] = {"choice": choice, "time_vs_fp32": {k: round(v, 4) for k, v in ratios.items()}}
    try:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as error:
        log.warning("auto precision: could not record the choice in %s (%s)", path, error)


def paired_ratios(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each candidate's median, over rounds, of its time divided by fp32's time in the same round."""
    reference = times["fp32"]
    return {
        name: statistics.median(t / r for t, r in zip(samples, reference, strict=True))
        for name, samples in times.items()
        if name != "fp32"
    }


def decide(times: Mapping[str, Sequence[float]], margin: float = MARGIN) -> str:
    """The fastest candidate whose paired time ratio to fp32 is at most ``1 / margin``; else ``"fp32"``."""
    ratios = paired_ratios(times)
    fast = {name: ratio for name, ratio in ratios.items() if ratio * margin <= 1.0}
    return min(fast, key=fast.__getitem__) if fast else "fp32"


def measure(
    contenders: Mapping[str, Callable[[Tensor], Any]],
    x: Tensor,
    *,
    budget_s: float = BUDGET_S,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
) -> dict[str, list[float]]:
    """Seconds per call of each contender on ``x``: one warm-up call each, then rounds in a rotating order.

    Rounds go on until ``budget_s`` is spent (at least ``min_rounds``, at most ``max_rounds``).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            contenders[name](x)
        start = time.perf_counter()
        for index in range(max_rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                begin = time.perf_counter()
                contenders[name](x)
                times[name].append(time.perf_counter() - begin)
            if index + 1 >= min_rounds and time.perf_counter() - start >= budget_s:
                break
    return times
