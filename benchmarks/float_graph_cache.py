"""The OpenVINO float backend's saved graph: building the copy in a fresh process, first time and later.

    .venv/bin/python -m benchmarks.float_graph_cache [--architecture se_resnext101_32x4d] [--processes 3]

Each round is a fresh process sharing one temporary ``TORCH_HOME`` (so one graph cache, nothing else):
it builds ``openvino_float`` (bf16) from the same seeded random weights and makes one call. The first
process converts and saves the graph; the later ones read it (``models/openvino_runtime.py``,
``float_graph_cache``). Prints each process's seconds and its ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
start = time.perf_counter()
import torch
from resnext_hub.models import build_model
from resnext_hub.models.fused import OptimizedResNet
from resnext_hub.models.openvino_runtime import openvino_float
torch.manual_seed(0)
exact = OptimizedResNet(build_model(sys.argv[1], pretrained=False).eval(), dtype=torch.float32, channels_last=False)
x = torch.randn(2, 3, 224, 224)
built = time.perf_counter()
model = openvino_float(exact, x, "bf16")
with torch.inference_mode():
    model(x[:1])
print(time.perf_counter() - built)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", default="se_resnext101_32x4d")
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "TORCH_HOME": home}
        seconds = []
        for _ in range(args.processes):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, args.architecture], env=env, capture_output=True, text=True, check=True
            )
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
    for i, value in enumerate(seconds):
        ratio = value / seconds[0]
        print(f"process {i + 1}: {value:.2f} s to build the OpenVINO bf16 copy and call it once ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
