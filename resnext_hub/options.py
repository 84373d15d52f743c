"""How a model runs for inference: one record, built once (from the command line, or by a library caller).

:class:`InferenceOptions` is what :class:`~resnext_hub.engine.Engine`, :func:`~resnext_hub.evaluate.evaluate`,
:func:`~resnext_hub.predict.predict`, ``serve`` and ``export`` take, instead of each deriving its own keywords.
The command line builds it in :func:`resnext_hub.arguments.inference_options`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding threads per process: the usable CPUs, shared among the processes that
    ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``), never more than there are CPUs."""
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(1, usable_cpus() // local_processes)


@dataclass(frozen=True)
class InferenceOptions:
    """Where and how inference runs.

    - ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` (a ``torch.device`` too);
      under ``torchrun`` the process group's device wins.
    - ``precision``: ``auto`` (the fastest faithful: see ``optimize_for_inference``), ``fp32`` (exact),
      ``bf16``, ``fp16`` (CUDA) or ``int8`` (needs ``calibration``); ``export`` also takes ``fp16``/``bf16``
      for the formats that have them, and defaults to ``fp32``.
    - ``calibration``: images to calibrate int8 on (paths/URLs, PIL images or preprocessed batches).
    - ``compile``: ``torch.compile`` the model.
    - ``workers``: decoding threads (at least one), in every command; default :func:`default_workers`.
    - ``batch_size``: images per forward pass; ``top_k``: classes per input (above the class count: all).
    - ``progress``: a progress bar on stderr.
    - ``exact_decode``: decode every pixel of large photos (default: at the size the preset needs, see
      ``processing.load_image``'s ``min_size``).
    """

    device: Any = "auto"
    precision: str = "auto"
    calibration: Any = None
    compile: bool = False
    workers: int = field(default_factory=default_workers)
    batch_size: int = 64
    top_k: int = 5
    progress: bool = False
    exact_decode: bool = False
