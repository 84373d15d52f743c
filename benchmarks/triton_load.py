"""Bounded load against a Triton server answering resnext-hub's contract: throughput and p50/p99 latency.

The server is ``python -m resnext_hub serve`` or a Triton deployment of the exported repository
(``export --format triton``): both publish the same models (resnext_hub/triton/contract.py). For
each concurrency level, that many client threads (one ``tritonclient`` connection each) send
``--requests`` single-sample requests in total, after a short warm-up; one line per level is printed,
and with ``--json`` one JSON object per level. Every request is bounded by ``--timeout``.

    python -m resnext_hub serve --model seresnext26d_32x4d --random-weights &
    python -m benchmarks.triton_load --model seresnext26d_32x4d --concurrency 1,4,8 --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from resnext_hub.triton.contract import IMAGE, IMAGE_SUFFIX, INPUT
from resnext_hub.triton.server import TOKEN_ENV

ROOT = Path(__file__).resolve().parent.parent


def _client(protocol: str, url: str, timeout: float):
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(url)


def _request(module, args: argparse.Namespace, payload: np.ndarray):
    if args.input == "image":
        tensor = module.InferInput(IMAGE, [1, 1], "BYTES")
    else:
        tensor = module.InferInput(INPUT, list(payload.shape), "FP32")
    tensor.set_data_from_numpy(payload)
    return [tensor]


def _statistics(args: argparse.Namespace, model: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from the server, where the token allows it."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return None
    module, client = _client(args.protocol, args.url, args.timeout)
    try:
        if args.protocol == "http":
            stats = client.get_inference_statistics(model, headers={"triton-access-token": token})
        else:  # gRPC metadata carries the same header under Triton's protocol prefix
            headers = {"triton-grpc-protocol-triton-access-token": token}
            stats = client.get_inference_statistics(model, headers=headers, as_json=True, client_timeout=args.timeout)
        model_stats = stats["model_stats"][0]
        return int(model_stats.get("inference_count", 0)), int(model_stats.get("execution_count", 0))
    finally:
        client.close()


def run_level(args: argparse.Namespace, concurrency: int, payload: np.ndarray, model: str) -> dict:
    local = threading.local()
    clients = []
    lock = threading.Lock()

    def one(_: int) -> float:
        if not hasattr(local, "client"):
            local.module, local.client = _client(args.protocol, args.url, args.timeout)
            with lock:
                clients.append(local.client)
        inputs = _request(local.module, args, payload)
        started = time.perf_counter()
        if args.protocol == "grpc":
            local.client.infer(model, inputs, client_timeout=args.timeout)
        else:
            local.client.infer(model, inputs)
        return time.perf_counter() - started

    before = _statistics(args, model)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up: connections, first batches
        started = time.perf_counter()
        latencies = sorted(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
    for client in clients:
        client.close()
    after = _statistics(args, model)
    result = {
        "protocol": args.protocol,
        "input": args.input,
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
    }
    if before and after and after[1] > before[1]:
        result["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    image_help = f"served name (the image model adds {IMAGE_SUFFIX})"
    parser.add_argument("--model", default="se_resnext101_32x4d", help=image_help)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8000 for HTTP, :8001 for gRPC)")
    parser.add_argument("--input", choices=("tensor", "image"), default="tensor")
    parser.add_argument("--image", default=str(ROOT / "assets" / "images" / "coffee.jpg"), help="for --input image")
    parser.add_argument("--image-size", type=int, default=224, help="tensor side for --input tensor")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (after warm-up)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="one JSON object per level instead of a table")
    args = parser.parse_args(argv)
    args.url = args.url or ("127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001")
    levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        parser.error("--concurrency levels and --requests must be positive")
    if args.input == "image":
        payload = np.array([[Path(args.image).read_bytes()]], dtype=object)
        model = args.model + IMAGE_SUFFIX
    else:
        payload = np.random.default_rng(0).standard_normal((1, 3, args.image_size, args.image_size), np.float32)
        model = args.model
    if not args.json:
        print(f"{model} over {args.protocol} at {args.url}, {args.requests} requests per level")
        print(f"{'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}")
    for level in levels:
        result = run_level(args, level, payload, model)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            batch = f"{result['mean_batch']:.2f}" if "mean_batch" in result else "-"
            print(
                f"{level:>11} {result['throughput_per_s']:>8.2f} {result['p50_ms']:>8.1f} "
                f"{result['p99_ms']:>8.1f} {batch:>10}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
