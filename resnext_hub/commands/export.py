"""``export``: a model to ONNX, TorchScript, pt2 or a Triton model repository, verified before it is done."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import exit_codes
from .. import export as exporting
from ..arguments import add_model_options, add_precision_options, inference_options, model_from_args
from ..console import printable
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
from ..outputs import check_output
from ..triton import config as triton_config
from ..triton.repository import export_triton

MIN_OPSET = 7  # the oldest ONNX opset torch.onnx writes
# The precisions each format is written in (int8: a QDQ ONNX file for ONNX Runtime on CPUs).
PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "torchscript": ("fp32",),
    "pt2": ("fp32", "bf16", "fp16"),
    "triton": ("fp32", "fp16"),
}


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with export's own options, if anything (checked before the model loads)."""
    if args.image_size is not None and args.image_size < 1:
        return f"--image-size must be at least 1, got {args.image_size}"
    if args.opset < MIN_OPSET:
        return f"--opset must be at least {MIN_OPSET}, got {args.opset}"
    if args.precision not in PRECISIONS[args.format]:
        formats = [name for name, precisions in PRECISIONS.items() if args.precision in precisions]
        return (
            f"--format {args.format} is written in {', '.join(PRECISIONS[args.format])}, not {args.precision}: "
            f"for --precision {args.precision} use --format {' or '.join(formats)}"
        )
    if args.format != "pt2" and resolve_device(args.device).type != "cpu":  # checked valid before
        return "--device applies to pt2 exports (the package is compiled for one device); the others run anywhere"
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
    options = inference_options(args)
    model = model_from_args(args)
    precision = options.precision
    if precision == "int8":  # onnxruntime's quantization tools load only here
        from ..export.onnx_int8 import export_onnx_int8

        return export_onnx_int8(
            model, args.output, calibration=options.calibration, image_size=args.image_size, opset=args.opset
        )
    if args.format == "pt2":
        return export_pt2(model, args.output, image_size=args.image_size, precision=precision, device=options.device)
    if args.format == "onnx":
        fp16 = precision == "fp16"
        return export_onnx(model, args.output, image_size=args.image_size, fp16=fp16, opset=args.opset)
    if args.format == "torchscript":
        return export_torchscript(model, args.output, image_size=args.image_size)
    names = ("name", "image_size", "opset", "max_batch_size", "preferred_batch_sizes", "queue_delay_us", "top_k")
    names += ("instance_kind", "instance_count", "accelerator", "image_ensemble", "overwrite")
    given = {name: getattr(args, name) for name in names}
    return export_triton(model, args.output, fp16=precision == "fp16", **given)


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
    add_precision_options(
        parser,
        choices=("fp32", "bf16", "fp16", "int8"),
        default="fp32",
        help="what the model computes in (default fp32): fp16 (ONNX/Triton graph; pt2 on CUDA), bf16 (pt2 on a CPU "
        "with native bf16), int8 (a QDQ ONNX file for ONNX Runtime on CPUs, calibrated on --calibration)",
        aliases=("--fp16", "--bf16"),
    )
    parser.add_argument("--device", default="cpu", help="pt2: the device it is compiled for, cpu or cuda[:N]")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
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
        "--no-image-ensemble",
        dest="image_ensemble",
        action="store_false",
        help="only the classifier (default: also <name>_preprocess and the <name>_image ensemble taking image bytes)",
    )
    triton.add_argument("--overwrite", action="store_true", help="replace existing model folders")
    parser.set_defaults(func=run, check_options=check)
