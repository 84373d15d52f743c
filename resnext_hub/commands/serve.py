"""``serve``: a model behind a real Triton Inference Server (PyTriton): HTTP + gRPC, dynamic batching.

Options are checked before the model loads (ports in 1..65535, distinct and free to listen on; batch
sizes; the request-size limit; the model name): a usage error is one line and exit status 2.
``--top-k`` above the model's class count serves all its classes. SIGTERM or SIGINT (Ctrl-C) stops
gracefully: the ports close, the requests in flight are answered (at most 30 s), then Triton and every
process it started end; exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from .. import exit_codes
from ..arguments import add_inference_options, add_model_options, inference_options, model_from_args
from ..console import printable
from ..engine import Engine
from ..triton import server as serving
from ..triton.bundle import ServeUnavailableError, check_interpreter
from ..triton.config import parse_batch_sizes
from ..triton.door import GRPC_MESSAGE_CAP
from ..triton.server import TOKEN_ENV, build_server

log = logging.getLogger(__name__)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MIN_REQUEST_BYTES = 1024  # room for a request's header
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_byte_count(text: str) -> int:
    """``"1048576"``, ``"64M"``, ``"1G"`` (K, M, G: powers of 1024; ``KiB``/``MiB``/``GiB`` too) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1048576, 64M or 1G, got {text!r}")
    return int(match[1]) * _UNITS[match[2].lower()]


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with serve's own options, if anything (checked with the others, before anything starts)."""
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port}
    if args.metrics_port != 0:
        ports["--metrics-port"] = args.metrics_port
    for option, port in ports.items():
        if not 1 <= port <= 65535:
            return f"{option} must be in 1..65535, got {port}"
    if len(set(ports.values())) < len(ports):
        return f"the ports must differ, got {', '.join(f'{o} {p}' for o, p in ports.items())}"
    if args.max_batch_size < 1:
        return f"--max-batch-size must be at least 1, got {args.max_batch_size}"
    bad = [size for size in args.preferred_batch_sizes if not 1 <= size <= args.max_batch_size]
    if bad:
        return f"--preferred-batch-sizes {bad} are outside 1..--max-batch-size ({args.max_batch_size})"
    if args.queue_delay_us < 0:
        return f"--queue-delay-us must be at least 0, got {args.queue_delay_us}"
    if args.max_request_bytes is not None and not MIN_REQUEST_BYTES <= args.max_request_bytes <= GRPC_MESSAGE_CAP:
        return (
            f"--max-request-bytes must be in {MIN_REQUEST_BYTES}..{GRPC_MESSAGE_CAP} (gRPC's message cap), "
            f"got {args.max_request_bytes}"
        )
    if args.name is not None and not _NAME.fullmatch(args.name):
        return f"--name {args.name!r} is not a model name: letters, digits, '_', '.', '-' (at most 128)"
    return None


def _check_ports(args: argparse.Namespace) -> None:
    """``ValueError`` unless each port can be listened on now (before the model loads)."""
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port}
    if args.metrics_port != 0:
        ports["--metrics-port"] = args.metrics_port
    for option, port in ports.items():
        try:
            infos = socket.getaddrinfo(args.host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            raise ValueError(f"--host {args.host!r} is not an address to listen on ({error})") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise ValueError(
                    f"cannot listen on {args.host}:{port} ({error.strerror or error}): pass another {option} "
                    "(or --host)"
                ) from None


def run(args: argparse.Namespace) -> int:
    try:
        library = check_interpreter()
    except ServeUnavailableError as error:
        print(f"error: {printable(error, backslashes=False, lines=True)}", file=sys.stderr)
        return exit_codes.SOME_FAILED
    if args.check:
        print(f"PyTriton can serve with this interpreter: Python {platform.python_version()}, {library}")
        return exit_codes.OK
    _check_ports(args)
    options = inference_options(args)
    model = model_from_args(args)
    engine = Engine(model, options)
    top_k = engine.clamp_k(options.top_k)
    if top_k < options.top_k:
        log.info("--top-k %d is above the %d classes of %s: serving all %d", options.top_k, top_k, args.model, top_k)
    scratch = Path(tempfile.mkdtemp(prefix="resnext-hub-triton-"))
    stopping = threading.Event()
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = build_server(
            engine,
            name=args.name or model.architecture,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=None if args.metrics_port == 0 else args.metrics_port,
            max_batch_size=args.max_batch_size,
            preferred_batch_sizes=args.preferred_batch_sizes,
            queue_delay_us=args.queue_delay_us,
            top_k=top_k,
            max_request_bytes=args.max_request_bytes,
            workspace=scratch / "workspace",
            access_token=os.environ.get(TOKEN_ENV) or None,
        )
        # Both stop gracefully; SIGINT explicitly too, since a shell's background job inherits it ignored.
        for number in previous:
            signal.signal(number, lambda *_: stopping.set())
        try:
            server.run()
        except OSError as error:  # a public port taken since it was checked
            raise ValueError(f"{error}: pass other ports (--http-port, --grpc-port) or another --host") from None
        try:
            log.info(
                "serving %s: HTTP %s:%d, gRPC %s:%d; requests up to %d bytes (--max-request-bytes)",
                args.model,
                args.host,
                args.http_port,
                args.host,
                args.grpc_port,
                server.door.max_request_bytes,
            )
            while not stopping.wait(1.0):
                if not server.is_alive():
                    print("error: the Triton server stopped on its own (see the log above)", file=sys.stderr)
                    return exit_codes.SOME_FAILED
            log.info("stopping: finishing the requests in flight")
        finally:
            server.stop()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
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
    parser.add_argument(
        "--max-request-bytes",
        type=parse_byte_count,
        default=None,
        help="refuse a larger request before reading it (HTTP 413, gRPC RESOURCE_EXHAUSTED); e.g. 64M. "
        "Default: --max-batch-size x the per-image byte cap (RESNEXT_HUB_MAX_IMAGE_BYTES, 40 MiB), plus 1 MiB",
    )
    add_inference_options(parser, aliases=("--exact", "--no-amp"))
    parser.add_argument("--check", action="store_true", help="only check that PyTriton works with this Python")
    parser.set_defaults(func=run, check_options=check)
