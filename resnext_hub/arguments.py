"""Command-line options shared by the subcommands: which model, where and how it runs, progress.

``--model`` takes any name of the entry-point registry: a hub entry point
(``nvidia_se_resnext101_32x4d``), an architecture (``se_resnext101_32x4d``) or timm's
``hf-hub:timm/<name>.<tag>`` id of a manifest record (architecture and weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .data import Skipped, expand_inputs
from .distributed import DistContext
from .engine import resolve_device
from .models import ResNet, build_model
from .models.openvino_ir import OpenVINOResNet, load_openvino_ir, openvino_ir_path
from .models.optimize import PRECISIONS
from .models.registry import architecture_of, model_names, split_model_id
from .models.weights import hf_hub_ids
from .options import InferenceOptions, default_workers

DEFAULT_MODEL = "se_resnext101_32x4d"
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
_OPTION_FIELDS = tuple(field.name for field in dataclasses.fields(InferenceOptions))


def add_model_options(parser: argparse.ArgumentParser, *, random_weights: bool = False) -> None:
    """``--model`` and one of ``--weights`` / ``--checkpoint`` (/ ``--random-weights``)."""
    names = sorted(model_names())
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        type=model_name,
        metavar="NAME",
        help=f"a hub entry point or architecture (default {DEFAULT_MODEL}): {', '.join(names)}; or timm's "
        f"Hugging Face id of its weights: {', '.join(hf_hub_ids())}",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="manifest tag or name (default: the model's default weights)")
    weights.add_argument(
        "--checkpoint",
        help="a local checkpoint file instead of the published weights, or a saved OpenVINO IR (export --format "
        "openvino: its folder or model.xml)",
    )
    if random_weights:
        weights.add_argument("--random-weights", action="store_true", help="random weights (to try the pipeline)")


def model_name(name: str) -> str:
    """``--model``'s value, checked: a registry name or a served ``hf-hub:`` id (else the choices, for argparse)."""
    try:
        architecture_of(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} ({error})") from None
    return name


def add_inference_options(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int | None = None,
    top_k: bool = True,
    per_process: bool = False,
    aliases: tuple[str, ...] = ("--exact",),
) -> None:
    """``--device``, ``--precision`` (with ``--calibration`` and the old spellings ``aliases``), ``--top-k`` and
    ``--batch-size`` (given a default).

    ``per_process`` (``evaluate``/``predict``, which run under torchrun): also ``--workers`` and ``--compile``.
    """
    device_help = "auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)" if per_process else DEVICE_HELP
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode every pixel of large photos (default: JPEG's DCT-domain downscaling to the size the preset needs)",
    )
    add_precision_options(parser, aliases=aliases)
    if top_k:
        parser.add_argument("--top-k", type=int, default=5)
    if batch_size is not None:
        per = ", per process" if per_process else ""
        parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward pass{per}")
    if per_process:
        parser.add_argument(
            "--workers",
            type=int,
            help=f"decoding threads per rank (at least one; default: the usable CPUs, {default_workers()} "
            "here, shared by the processes torchrun starts on a machine)",
        )
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
    if (getattr(args, "workers", None) or 0) < 0:
        return f"--workers must be at least 0, got {args.workers}"
    if getattr(args, "device", None) is not None:
        try:
            resolve_device(args.device)
        except ValueError as error:
            return f"--device: {error}"
    problem = _check_precision(args) or _check_weights(args)
    if problem:
        return problem
    check = getattr(args, "check_options", None)
    return check(args) if check is not None else None


def _check_weights(args: argparse.Namespace) -> str | None:
    """An ``hf-hub:`` id names its weights: a ``--weights`` other than those is a contradiction."""
    if getattr(args, "model", None) is None or getattr(args, "weights", None) is None:
        return None
    weights = split_model_id(args.model)[1]
    if weights is not None and args.weights not in (weights, weights.split(".", 1)[1]):
        return f"--model {args.model} names the weights {weights}; --weights {args.weights} contradicts it: give one"
    return None


def report_skipped(skipped: list[Skipped]) -> None:
    """One warning line on stderr per folder that could not be read."""
    for entry in skipped:
        print(f"warning: {entry}", file=sys.stderr)


# -- precision: one option, its old spellings, and --calibration (int8) ---------------------------------

# Old spellings of --precision: still accepted, each with one warning line, meaning this precision.
PRECISION_ALIASES = {"--exact": "fp32", "--no-amp": "fp32", "--fp16": "fp16", "--bf16": "bf16"}
INFERENCE_PRECISION_HELP = (
    "auto (default: the fastest faithful, e.g. bf16 on CPUs with native bf16, fp16 on CUDA), fp32 (exact), bf16, "
    "fp16 (CUDA), int8 (needs --calibration)"
)


class _PrecisionOption(argparse.Action):
    """``--precision VALUE``, or an old spelling of one value (``const``), which says so on stderr.

    Each use is recorded in ``precision_given`` ((option, value) pairs), so that :func:`check_options`
    can refuse two that disagree, in whichever order they come.
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        value = values if self.const is None else self.const
        if self.const is not None:
            print(f"warning: {option} is deprecated; use --precision {value}", file=sys.stderr)
        namespace.precision = value
        namespace.precision_given = [*getattr(namespace, "precision_given", []), (option, value)]


def add_precision_options(
    parser: argparse.ArgumentParser,
    *,
    choices: tuple[str, ...] = PRECISIONS,
    default: str = "auto",
    help: str = INFERENCE_PRECISION_HELP,
    aliases: tuple[str, ...] = (),
) -> None:
    """``--precision`` (one of ``choices``), its old spellings ``aliases`` (hidden from ``--help``) and
    ``--calibration DIR`` (for int8)."""
    parser.add_argument("--precision", action=_PrecisionOption, choices=choices, default=default, help=help)
    for alias in aliases:
        parser.add_argument(
            alias,
            action=_PrecisionOption,
            nargs=0,
            const=PRECISION_ALIASES[alias],
            dest="precision",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        help="images to calibrate int8 on (a folder, searched recursively, or one image): a few hundred like the "
        "inputs; with --precision auto, int8 is tried first",
    )


def _spelled(option: str, value: str) -> str:
    return f"--precision {value}" if option == "--precision" else option


def _check_precision(args: argparse.Namespace) -> str | None:
    given = getattr(args, "precision_given", [])
    clash = next((pair for pair in given if pair[1] != given[0][1]), None)
    if clash is not None:
        (option, value), other = sorted([given[0], clash], key=lambda pair: pair[0] == "--precision")
        if option == "--precision":
            return f"--precision is given twice, as {value} and {other[1]}: give it once"
        return f"{option} means --precision {value}; it cannot be combined with {_spelled(*other)}"
    precision, calibration = getattr(args, "precision", None), getattr(args, "calibration", None)
    if precision == "int8" and not calibration:
        return "--precision int8 needs --calibration DIR (a folder of images like the ones to classify)"
    if calibration and precision not in ("auto", "int8"):
        return f"--calibration applies to --precision int8 or auto, not {precision}"
    return None


def _calibration_images(folder: str | None) -> list[str] | None:
    """The image files of ``--calibration`` (a folder is searched recursively), or None without it."""
    if not folder:
        return None
    images = expand_inputs([folder])
    if not images:
        raise ValueError(f"--calibration {folder}: no images found there")
    return images


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The command's one :class:`InferenceOptions`, from its (checked) arguments; what a command lacks keeps
    the record's default. ``--calibration DIR`` becomes its image files (``ValueError`` when it has none)."""
    given = {name: getattr(args, name) for name in _OPTION_FIELDS if getattr(args, name, None) is not None}
    given["calibration"] = _calibration_images(getattr(args, "calibration", None))
    given["progress"] = bool(given.get("progress"))
    if given.get("device", "auto") == "auto" and openvino_ir_path(getattr(args, "checkpoint", None) or ""):
        given["device"] = "cpu"  # a saved IR runs on the CPU only: there "auto" means the CPU, even beside a GPU
    return InferenceOptions(**given)


def model_from_args(
    args: argparse.Namespace, *, ctx: DistContext | None = None, **kwargs: Any
) -> ResNet | OpenVINOResNet:
    """The model that :func:`add_model_options`' options name.

    A ``--checkpoint`` that is a saved OpenVINO IR (``export --format openvino``: the folder or its
    ``model.xml``) gives that IR, compiled, with its own classes and preset (no calibration).
    With ``ctx`` (several processes), rank 0 fetches the weights first and the others then read the cache.
    """
    architecture, weights = split_model_id(args.model)
    ir = openvino_ir_path(args.checkpoint) if getattr(args, "checkpoint", None) else None
    if ir is not None:
        return load_openvino_ir(ir, architecture=architecture_of(architecture))
    if ctx is not None:
        with ctx.main_first():
            return model_from_args(args, progress=ctx.is_main, **kwargs)
    return build_model(
        architecture_of(architecture),
        pretrained=not getattr(args, "random_weights", False),
        pretrained_from_file=args.checkpoint,
        weights=args.weights or weights,
        **kwargs,
    )
