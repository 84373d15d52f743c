"""Command-line options shared by the subcommands: which model, where and how it runs, progress.

``--model`` takes any name of the entry-point registry: a hub entry point
(``nvidia_se_resnext101_32x4d``) or an architecture (``se_resnext101_32x4d``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .data import Skipped, expand_inputs
from .distributed import DistContext
from .engine import resolve_device
from .models import ResNet, build_model
from .models.optimize import PRECISIONS
from .models.registry import architecture_of, model_names

DEFAULT_MODEL = "se_resnext101_32x4d"
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def add_model_options(parser: argparse.ArgumentParser, *, random_weights: bool = False) -> None:
    """``--model`` and one of ``--weights`` / ``--checkpoint`` (/ ``--random-weights``)."""
    names = sorted(model_names())
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=names,
        metavar="NAME",
        help=f"a hub entry point or architecture (default {DEFAULT_MODEL}): {', '.join(names)}",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="manifest tag or name (default: the model's default weights)")
    weights.add_argument("--checkpoint", help="a local checkpoint file instead of the published weights")
    if random_weights:
        weights.add_argument("--random-weights", action="store_true", help="random weights (to try the pipeline)")


def add_inference_options(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int | None = None,
    top_k: bool = True,
    per_process: bool = False,
    no_amp: bool = False,
) -> None:
    """``--device``, ``--exact`` (and ``--no-amp``), ``--top-k`` and ``--batch-size`` (given a default).

    ``per_process`` (``evaluate``/``predict``, which run under torchrun): also ``--workers`` and ``--compile``.
    """
    device_help = "auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)" if per_process else DEVICE_HELP
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument(
        "--exact", action="store_true", help="exact fp32 (default: the fastest faithful precision, e.g. bf16 on CPU)"
    )
    if no_amp:
        parser.add_argument("--no-amp", action="store_true", help="on CUDA, run in fp32 instead of fp16")
    add_precision_options(parser)
    if top_k:
        parser.add_argument("--top-k", type=int, default=5)
    if batch_size is not None:
        per = ", per process" if per_process else ""
        parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward pass{per}")
    if per_process:
        parser.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (0: in-process)")
        parser.add_argument("--compile", action="store_true", help="torch.compile the model (tens of seconds once)")


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``; neither leaves ``None`` (show it on a terminal)."""
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def check_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the options given, if anything (for ``parser.error``): numbers, the device,
    then the command's own check (its ``check`` default), all before any model loads."""
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "top_k", 1) < 1:
        return "--batch-size and --top-k must be at least 1"
    if getattr(args, "workers", 0) < 0:
        return f"--workers must be at least 0, got {args.workers}"
    if getattr(args, "device", None) is not None:
        try:
            resolve_device(args.device)
        except ValueError as error:
            return f"--device: {error}"
    problem = _check_precision(args)
    if problem:
        return problem
    check = getattr(args, "check_options", None)
    return check(args) if check is not None else None


def report_skipped(skipped: list[Skipped]) -> None:
    """One warning line on stderr per folder that could not be read."""
    for entry in skipped:
        print(f"warning: {entry}", file=sys.stderr)


def precision_from_args(args: argparse.Namespace) -> str:
    """``--precision`` if given; else ``fp32`` for ``--exact`` (and for ``--no-amp`` on CUDA), else ``auto``."""
    if getattr(args, "precision", None):
        return args.precision
    if args.exact or (getattr(args, "no_amp", False) and resolve_device(args.device).type == "cuda"):
        return "fp32"
    return "auto"


# -- int8 (issue 14): --precision and --calibration ----------------------------------------------------


def add_precision_options(
    parser: argparse.ArgumentParser,
    choices: tuple[str, ...] = PRECISIONS,
    help: str = "auto (default: the fastest faithful), fp32 (= --exact), bf16, fp16 (CUDA), int8 (needs --calibration)",
) -> None:
    """``--precision`` (one of ``choices``) and ``--calibration DIR`` (for int8)."""
    parser.add_argument("--precision", choices=choices, help=help)
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        help="images to calibrate int8 on (a folder, searched recursively, or one image): a few hundred like the "
        "inputs; with --precision auto, int8 is tried first",
    )


def _check_precision(args: argparse.Namespace) -> str | None:
    precision, calibration = getattr(args, "precision", None), getattr(args, "calibration", None)
    if precision and getattr(args, "exact", False) and precision != "fp32":
        return f"--exact means --precision fp32; it cannot be combined with --precision {precision}"
    if precision == "int8" and not calibration:
        return "--precision int8 needs --calibration DIR (a folder of images like the ones to classify)"
    if calibration and precision not in (None, "auto", "int8"):
        return f"--calibration applies to --precision int8 or auto, not {precision}"
    if calibration and getattr(args, "exact", False):
        return "--calibration applies to --precision int8 or auto, not --exact (fp32)"
    return None


def calibration_from_args(args: argparse.Namespace) -> list[str] | None:
    """The image files of ``--calibration`` (a folder is searched recursively), or None without it."""
    folder = getattr(args, "calibration", None)
    if not folder:
        return None
    images = expand_inputs([folder])
    if not images:
        raise ValueError(f"--calibration {folder}: no images found there")
    return images


def model_from_args(args: argparse.Namespace, *, ctx: DistContext | None = None, **kwargs: Any) -> ResNet:
    """The model that :func:`add_model_options`' options name.

    With ``ctx`` (several processes), rank 0 fetches the weights first and the others then read the cache.
    """
    if ctx is not None:
        with ctx.main_first():
            return model_from_args(args, progress=ctx.is_main, **kwargs)
    return build_model(
        architecture_of(args.model),
        pretrained=not getattr(args, "random_weights", False),
        pretrained_from_file=args.checkpoint,
        weights=args.weights,
        **kwargs,
    )
