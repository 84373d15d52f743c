"""``export``: a model to ONNX, TorchScript, pt2 or a Triton model repository, verified before it is done."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import exit_codes
from .. import export as exporting
from ..arguments import add_model_options, add_precision_options, inference_options, model_from_args
from ..console import printable
from ..distributed import sigterm_as_exit
from ..engine import resolve_device
from ..export import (
    DEFAULT_OPSET,
    FORMATS,
    ExportError,
    ExportResult,
    export_onnx,
    export_pt2,
    export_torchscript,
)
from ..export.onnx_versions import MAX_OPSET, MIN_OPSET, opset_problem
from ..models.hf_config import timm_architecture
from ..models.openvino_ir import openvino_ir_path
from ..models.registry import architecture_of
from ..outputs import check_output, write_problem
from ..triton import config as triton_config
from ..triton.repository import export_triton, model_folders

# The precisions each format is written in (int8: a QDQ ONNX file for ONNX Runtime on CPUs).
PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "torchscript": ("fp32",),
    "pt2": ("fp32", "bf16", "fp16"),
    "triton": ("fp32", "fp16"),
    "hf": ("fp32",),
    "openvino": ("fp32", "bf16", "int8"),  # an IR folder (model.xml + model.bin) for OpenVINO's runtime
}


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with export's own options, if anything (checked before the model loads)."""
    if args.image_size is not None and args.image_size < 1:
        return f"--image-size must be at least 1, got {args.image_size}"
    if args.format in ("onnx", "triton") and opset_problem(args.opset):
        return f"--{opset_problem(args.opset)}"
    openvino_triton = args.format == "triton" and args.classifier == "openvino"
    if openvino_triton and (args.accelerator is not None or args.instance_kind == "gpu"):
        return "--classifier openvino runs on CPU instances (Triton's OpenVINO backend): drop the GPU options"
    if openvino_triton and args.precision not in PRECISIONS["openvino"]:
        shown = ", ".join(PRECISIONS["openvino"])
        return f"--classifier openvino is written in {shown}, not {args.precision}: use --classifier onnx for fp16"
    if args.precision not in PRECISIONS[args.format] and not openvino_triton:
        formats = [name for name, precisions in PRECISIONS.items() if args.precision in precisions]
        return (
            f"--format {args.format} is written in {', '.join(PRECISIONS[args.format])}, not {args.precision}: "
            f"for --precision {args.precision} use --format {' or '.join(formats)}"
        )
    if args.checkpoint and openvino_ir_path(args.checkpoint):
        return f"--checkpoint {printable(args.checkpoint)} is an OpenVINO IR, an export already: give the weights file"
    if args.format == "hf":
        try:
            timm_architecture(architecture_of(args.model))
        except ValueError as error:
            return str(error)
    if args.format != "pt2" and resolve_device(args.device).type != "cpu":  # checked valid before
        return "--device applies to pt2 exports (the package is compiled for one device); the others run anywhere"
    if args.format == "triton":
        if args.max_batch_size < 1 or args.instance_count < 1 or args.queue_delay_us < 0:
            return "--max-batch-size and --instance-count must be at least 1, --queue-delay-us at least 0"
        bad = [size for size in args.preferred_batch_sizes if not 1 <= size <= args.max_batch_size]
        if bad:
            return f"--preferred-batch-sizes {bad} are outside 1..--max-batch-size ({args.max_batch_size})"
    try:
        return _check_paths(args)
    except ValueError as error:
        return str(error)


def _check_paths(args: argparse.Namespace) -> str | None:
    """Where export writes, before the model loads: a place it may write, nothing there it would replace
    without ``--overwrite``, and never its own input (``ValueError`` from :func:`check_output` too)."""
    output = Path(args.output)
    shown = printable(args.output)
    if args.format == "triton":
        if output.exists() and not output.is_dir():
            return f"--output {shown} is not a folder (a Triton model repository is one)"
        if not output.exists():
            check_output(output)  # a folder can be created there
        elif not os.access(output, os.W_OK | os.X_OK):
            return f"--output {shown}: no permission to create folders in it: give a repository this user may write to"
        name = args.name or architecture_of(args.model)
        targets = [output / folder for folder in model_folders(name, image_ensemble=args.image_ensemble)]
    elif args.format == "hf":
        if output.exists() and not output.is_dir():
            return f"--output {shown} is not a folder (timm's Hugging Face format is one): give a folder path"
        if not output.exists():
            check_output(output)  # a folder can be created there
        targets = [output]
    elif args.format == "openvino":  # a folder, swapped whole (processing.atomic.install_folders)
        if output.exists() and not output.is_dir():
            return f"--output {shown} is not a folder (an OpenVINO IR is one: model.xml + model.bin)"
        if not output.exists():
            check_output(output)  # a folder can be created there
        elif not os.access(output.parent, os.W_OK | os.X_OK):
            return f"--output {shown}: no permission to replace it in {printable(output.parent)}: give another path"
        targets = [output]
    else:
        check_output(args.output, replaced=True)
        targets = [output]
    existing = [target for target in targets if os.path.lexists(target)]
    checkpoint = args.checkpoint and Path(args.checkpoint).expanduser()
    if checkpoint and checkpoint.is_file() and not os.access(checkpoint, os.R_OK):  # (a missing one: the loader says)
        given = printable(args.checkpoint)
        return f"--checkpoint {given} cannot be read (permission denied): make it readable to this user, or give a copy"
    if checkpoint and any(_holds(target, checkpoint) for target in existing):
        given = printable(args.checkpoint)
        return f"--output {shown} would replace --checkpoint {given}, the export's own input: give another path"
    if existing and not args.overwrite:
        found = ", ".join(printable(target) for target in existing)
        return (
            f"--output: {found} already exists: pass --overwrite to replace it (the old one stays until the new one "
            "is verified), or give another path" + (" or --name" if args.format == "triton" else "")
        )
    return None


def _holds(target: Path, checkpoint: Path) -> bool:
    """Whether replacing ``target`` replaces ``checkpoint``: the same file (by identity: links, symbolic or hard,
    count) or a folder holding it."""
    try:
        if os.path.samestat(os.stat(target), os.stat(checkpoint)):
            return True
        return target.is_dir() and checkpoint.resolve().is_relative_to(target.resolve())
    except OSError:  # one of them cannot be reached: the checks of each say so
        return False


def run(args: argparse.Namespace) -> int:
    """Export; SIGTERM stops it as Ctrl-C does (exit 143, 130 for Ctrl-C): no staged file is left, nothing replaced."""
    try:
        with sigterm_as_exit():
            result = _export(args)
    except (ExportError, ImportError) as error:
        print(f"error: {printable(error, backslashes=False, lines=True)}", file=sys.stderr)
        return exit_codes.SOME_FAILED
    except OSError as error:  # a file-system fault outside an exporter's own staging (the Triton repository's)
        print(f"error: {write_problem(error, args.output)}; nothing was written", file=sys.stderr)
        return exit_codes.SOME_FAILED
    print(result.summary())
    return exit_codes.OK


def _export(args: argparse.Namespace) -> ExportResult:
    options = inference_options(args)
    model = model_from_args(args)
    precision = options.precision
    replace = {"overwrite": args.overwrite}
    if args.format == "openvino":  # OpenVINO (and NNCF for int8) load only here
        from ..export.openvino_ir import export_openvino

        size, calibration = args.image_size, options.calibration
        return export_openvino(
            model, args.output, precision=precision, calibration=calibration, image_size=size, **replace
        )
    if precision == "int8" and args.format == "onnx":  # onnxruntime's quantization tools load only here
        from ..export.onnx_int8 import export_onnx_int8

        calibration = options.calibration
        return export_onnx_int8(
            model, args.output, calibration=calibration, image_size=args.image_size, opset=args.opset, **replace
        )
    if args.format == "pt2":
        device = options.device
        return export_pt2(model, args.output, image_size=args.image_size, precision=precision, device=device, **replace)
    if args.format == "onnx":
        fp16 = precision == "fp16"
        return export_onnx(model, args.output, image_size=args.image_size, fp16=fp16, opset=args.opset, **replace)
    if args.format == "torchscript":
        return export_torchscript(model, args.output, image_size=args.image_size, **replace)
    if args.format == "hf":
        from ..export.hf_folder import export_hf

        return export_hf(model, args.output, image_size=args.image_size, **replace)
    names = ("name", "image_size", "opset", "max_batch_size", "preferred_batch_sizes", "queue_delay_us", "top_k")
    names += ("instance_kind", "instance_count", "accelerator", "image_ensemble", "classifier")
    given = {name: getattr(args, name) for name in names}
    if args.classifier == "openvino":
        given.update(precision=precision, calibration=options.calibration)
    return export_triton(model, args.output, fp16=precision == "fp16", **given, **replace)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX, TorchScript, pt2 (AOTInductor), a Triton repository or an hf folder (verified)",
        description=exporting.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, random_weights=True)
    parser.add_argument("--format", choices=FORMATS, default="triton")
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        help="file (onnx, torchscript, pt2), model repository folder (triton), folder (hf) or IR folder (openvino: "
        "model.xml + model.bin)",
    )
    parser.add_argument("--image-size", type=int, help="input height = width (default: the weights' crop size)")
    add_precision_options(
        parser,
        choices=("fp32", "bf16", "fp16", "int8"),
        default="fp32",
        help="what the model computes in (default fp32): fp16 (ONNX/Triton graph; pt2 on CUDA), bf16 (pt2 on a CPU "
        "with native bf16; an OpenVINO IR), int8 (a QDQ ONNX file for ONNX Runtime on CPUs, or an OpenVINO IR; "
        "calibrated on --calibration)",
        aliases=("--fp16", "--bf16"),
    )
    parser.add_argument("--device", default="cpu", help="pt2: the device it is compiled for, cpu or cuda[:N]")
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default %(default)s, with IR version 8: ONNX Runtime 1.14 and "
        "later read it; docs/onnx.md)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (the file, or the model's folders in a Triton repository; its other models "
        "stay): the old one stays until the new one is verified",
    )
    triton = parser.add_argument_group("triton")
    triton.add_argument("--name", help="model name in the repository (default: the architecture)")
    triton.add_argument("--top-k", type=int, default=5, help="classes per answer (above the class count: all)")
    triton.add_argument("--max-batch-size", type=int, default=32)
    sizes = triton_config.parse_batch_sizes
    triton.add_argument("--preferred-batch-sizes", type=sizes, default=[8, 16], help="e.g. 8,16")
    triton.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher's max queue delay")
    triton.add_argument("--instance-kind", choices=triton_config.INSTANCE_KINDS, help="default: Triton decides")
    triton.add_argument("--instance-count", type=int, default=1)
    triton.add_argument("--accelerator", choices=triton_config.ACCELERATORS, help="ONNX Runtime's TensorRT provider")
    triton.add_argument(
        "--classifier",
        choices=triton_config.CLASSIFIERS,
        default="onnx",
        help="the classifier's runtime: onnx (ONNX Runtime, default) or openvino (an OpenVINO IR for Triton's OpenVINO "
        "backend, CPU: --precision fp32, bf16 or int8 with --calibration)",
    )
    triton.add_argument(
        "--no-image-ensemble",
        dest="image_ensemble",
        action="store_false",
        help="only the classifier (default: also <name>_preprocess and the <name>_image ensemble taking image bytes)",
    )
    parser.set_defaults(func=run, check_options=check)
