"""``serve``: a model behind a real Triton Inference Server (PyTriton): HTTP + gRPC, dynamic batching."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .. import exit_codes
from .. import serve as serving
from ..arguments import (
    add_inference_options,
    add_model_options,
    calibration_from_args,
    model_from_args,
    precision_from_args,
)
from ..engine import Engine
from ..serve import TOKEN_ENV, ServeUnavailableError, build_server, check_interpreter
from ..triton import parse_batch_sizes

log = logging.getLogger(__name__)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # PyTriton's serve() stops cleanly on it


def run(args: argparse.Namespace) -> int:
    try:
        library = check_interpreter()
    except ServeUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.SOME_FAILED
    if args.check:
        print(f"PyTriton can serve with this interpreter: Python {platform.python_version()}, {library}")
        return exit_codes.OK
    model = model_from_args(args)
    engine = Engine(
        model, device=args.device, precision=precision_from_args(args), calibration=calibration_from_args(args)
    )
    scratch = Path(tempfile.mkdtemp(prefix="resnext-hub-triton-"))
    try:
        triton = build_server(
            engine,
            name=args.name or model.architecture,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=None if args.metrics_port == 0 else args.metrics_port,
            max_batch_size=args.max_batch_size,
            preferred_batch_sizes=args.preferred_batch_sizes,
            queue_delay_us=args.queue_delay_us,
            top_k=args.top_k,
            workspace=scratch / "workspace",
            access_token=os.environ.get(TOKEN_ENV) or None,
        )
        # Both stop the server cleanly; SIGINT explicitly too, since a shell's background job inherits it ignored.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        log.info("serving %s: HTTP %s:%d, gRPC %s:%d", args.model, args.host, args.http_port, args.host, args.grpc_port)
        triton.serve()  # blocks until SIGINT/SIGTERM, then stops the server
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model with Triton Inference Server (PyTriton): HTTP + gRPC, dynamic batching",
        description=serving.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, random_weights=True)
    parser.add_argument("--name", help="model name on the server (default: the architecture); images: <name>_image")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics; 0 turns them off")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--preferred-batch-sizes", type=parse_batch_sizes, default=[8, 16], help="e.g. 8,16")
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="how long a request may wait for a batch")
    add_inference_options(parser, no_amp=True)
    parser.add_argument("--check", action="store_true", help="only check that PyTriton works with this Python")
    parser.set_defaults(func=run)
