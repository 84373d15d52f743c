"""``export``: a model to ONNX, TorchScript, pt2 or a Triton model repository, verified before it is done."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import exit_codes
from .. import export as exporting
from .. import triton as triton_config
from ..arguments import add_model_options, add_precision_options, calibration_from_args, model_from_args
from ..export import (
    DEFAULT_OPSET,
    FORMATS,
    ExportError,
    ExportResult,
    export_onnx,
    export_pt2,
    export_torchscript,
    export_triton,
)
from ..models import ResNet
from ..results import check_output, printable

MIN_OPSET = 7  # the oldest ONNX opset torch.onnx writes


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with export's own options, if anything (checked before the model loads)."""
    if args.image_size is not None and args.image_size < 1:
        return f"--image-size must be at least 1, got {args.image_size}"
    if args.opset < MIN_OPSET:
        return f"--opset must be at least {MIN_OPSET}, got {args.opset}"
    if args.format == "triton":
        if args.max_batch_size < 1 or args.instance_count < 1 or args.queue_delay_us < 0:
            return "--max-batch-size and --instance-count must be at least 1, --queue-delay-us at least 0"
        bad = [size for size in args.preferred_batch_sizes if not 1 <= size <= args.max_batch_size]
        if bad:
            return f"--preferred-batch-sizes {bad} are outside 1..--max-batch-size ({args.max_batch_size})"
    try:
        if args.format == "triton":
            repository = Path(args.output)
            if repository.exists() and not repository.is_dir():
                return f"--output {printable(args.output)} is not a folder (a Triton model repository is one)"
            if not repository.exists():
                check_output(repository)  # a folder can be created there
        else:
            check_output(args.output, replaced=True)
    except ValueError as error:
        return str(error)
    return None


def run(args: argparse.Namespace) -> int:
    try:
        result = _export(args)
    except (ExportError, ImportError) as error:
        print(f"error: {printable(error, backslashes=False, lines=True)}", file=sys.stderr)
        return exit_codes.SOME_FAILED
    print(result.summary())
    return exit_codes.OK


def _export(args: argparse.Namespace) -> ExportResult:
    if args.fp16 and args.format == "torchscript":
        raise ValueError("--fp16 applies to ONNX, pt2 and Triton exports; TorchScript is exported in fp32")
    if args.format != "pt2" and (args.bf16 or args.device != "cpu"):
        raise ValueError("--bf16 and --device apply to pt2 exports (the package is compiled for one device)")
    model = model_from_args(args)
    if getattr(args, "precision", None) == "int8":
        return _export_int8(args, model)
    if args.format == "pt2":
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        return export_pt2(model, args.output, image_size=args.image_size, precision=precision, device=args.device)
    if args.format == "onnx":
        return export_onnx(model, args.output, image_size=args.image_size, fp16=args.fp16, opset=args.opset)
    if args.format == "torchscript":
        return export_torchscript(model, args.output, image_size=args.image_size)
    options = ("name", "image_size", "fp16", "opset", "max_batch_size", "preferred_batch_sizes", "queue_delay_us")
    options += ("instance_kind", "instance_count", "accelerator", "image_ensemble", "overwrite")
    return export_triton(model, args.output, **{option: getattr(args, option) for option in options})


def _export_int8(args: argparse.Namespace, model: ResNet) -> ExportResult:
    """``--precision int8``: a QDQ ONNX file for ONNX Runtime on CPUs, calibrated on ``--calibration``."""
    from ..export.onnx_int8 import export_onnx_int8  # onnxruntime's quantization tools load only here

    if args.format != "onnx" or args.fp16:
        raise ValueError("--precision int8 writes an ONNX file: use --format onnx, without --fp16")
    calibration = calibration_from_args(args)
    return export_onnx_int8(model, args.output, calibration=calibration, image_size=args.image_size, opset=args.opset)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX, TorchScript, pt2 (AOTInductor) or a Triton model repository (verified)",
        description=exporting.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, random_weights=True)
    parser.add_argument("--format", choices=FORMATS, default="triton")
    parser.add_argument(
        "--output", "-o", required=True, help="file (onnx, torchscript, pt2) or model repository folder (triton)"
    )
    parser.add_argument("--image-size", type=int, help="input height = width (default: the weights' crop size)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="compute in fp16 (ONNX/Triton graph; pt2 on CUDA)")
    precision.add_argument("--bf16", action="store_true", help="compute in bf16 (pt2 on a CPU with native bf16)")
    parser.add_argument("--device", default="cpu", help="pt2: the device it is compiled for, cpu or cuda[:N]")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    add_precision_options(
        parser, choices=("fp32", "int8"), help="int8: a QDQ ONNX file for ONNX Runtime on CPUs (--format onnx)"
    )
    triton = parser.add_argument_group("triton")
    triton.add_argument("--name", help="model name in the repository (default: the architecture)")
    triton.add_argument("--max-batch-size", type=int, default=32)
    sizes = triton_config.parse_batch_sizes
    triton.add_argument("--preferred-batch-sizes", type=sizes, default=[8, 16], help="e.g. 8,16")
    triton.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher's max queue delay")
    triton.add_argument("--instance-kind", choices=triton_config.INSTANCE_KINDS, help="default: Triton decides")
    triton.add_argument("--instance-count", type=int, default=1)
    triton.add_argument("--accelerator", choices=triton_config.ACCELERATORS, help="ONNX Runtime's TensorRT provider")
    triton.add_argument(
        "--no-image-ensemble",
        dest="image_ensemble",
        action="store_false",
        help="only the classifier (default: also <name>_preprocess and the <name>_image ensemble taking image bytes)",
    )
    triton.add_argument("--overwrite", action="store_true", help="replace existing model folders")
    parser.set_defaults(func=run, check_options=check)
