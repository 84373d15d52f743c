"""The torch copies' oneDNN convolutions with fused ReLU / residual sum against the plain ops, in one process.

    .venv/bin/python -m benchmarks.fused_conv                       # SE-ResNeXt101 and ResNeXt101, bf16 and fp32
    .venv/bin/python -m benchmarks.fused_conv --models seresnext26d_32x4d --precisions bf16 --rounds 3

For each model and precision: one ``optimize_for_inference`` copy, called with :func:`models.fused.onednn_conv`'s
oneDNN op and without it (the plain conv, then ReLU / add as separate passes), round-robin, batch 16 at 224x224.
Prints img/s (medians), their ratio, and the largest logit difference between the two paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.end_to_end import cpu_kind
from resnext_hub.models import build_model, fused


def timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return len(x) / (time.perf_counter() - start)


def compare(architecture: str, precision: str, rounds: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_model(architecture, pretrained=False).eval().optimize_for_inference(precision)
    x = torch.randn(batch, 3, 224, 224)
    op = fused._CONV_POINTWISE
    paths = {"fused": op, "plain": None}
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    logits = {}
    try:
        with torch.inference_mode():
            for name, value in paths.items():
                fused._CONV_POINTWISE = value
                logits[name] = model(x)  # warm-up (and the packing, for the fused path)
            for _ in range(rounds):
                for name, value in paths.items():
                    fused._CONV_POINTWISE = value
                    speeds[name].append(timed(model, x))
    finally:
        fused._CONV_POINTWISE = op
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    return {
        "img/s": medians,
        "ratio": medians["fused"] / medians["plain"],
        "max_logit_diff": (logits["fused"] - logits["plain"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="se_resnext101_32x4d,resnext101_32x4d")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if fused._CONV_POINTWISE is None:
        raise SystemExit("this torch build has no oneDNN convolution op: nothing to compare")
    print(f"CPU: {cpu_kind()}; load average {os.getloadavg()[0]:.1f} at start")
    print("| model | precision | fused img/s | plain img/s | fused / plain | max logit difference |")
    print("|---|---|---|---|---|---|")
    for architecture in args.models.split(","):
        for precision in args.precisions.split(","):
            if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                print(f"| {architecture} | bf16 | this CPU has no native bf16: skipped | | | |")
                continue
            r = compare(architecture, precision, args.rounds, args.batch_size)
            print(
                f"| {architecture} | {precision} | {r['img/s']['fused']:.2f} | {r['img/s']['plain']:.2f} "
                f"| {r['ratio']:.2f} | {r['max_logit_diff']:.2g} |"
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
