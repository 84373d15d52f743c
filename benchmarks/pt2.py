"""pt2 packages (torch.export + AOTInductor) against eager: compile and load time, img/s, parity.

Run from the repo root::

    .venv/bin/python -m benchmarks.pt2 --model seresnext26d_32x4d --batch-sizes 1,16
    .venv/bin/python -m benchmarks.pt2 --model se_resnext101_32x4d --precisions fp32 --json pt2.json

Each precision is exported with :func:`resnext_hub.export.export_pt2` (so verified in a fresh process
that cannot import this repository; its load time is that process's ``aoti_load_package``), then
loaded here and timed round-robin with the plain eager model and the eager ``optimize_for_inference``
copy of the same precision: img/s is the best round. Parity is the max |logit diff| against the plain
model on one batch of 4 random images. Weights are random with trained-like BatchNorm statistics
unless ``--checkpoint`` is given (speed does not depend on the values). Every mode runs with glibc
keeping freed memory for reuse (what ``optimize_for_inference`` switches on for the process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from resnext_hub.engine import resolve_device
from resnext_hub.export import export_pt2
from resnext_hub.models import build_model
from resnext_hub.models.cpu import cpu_has_native_bf16, reuse_freed_memory
from tools.fake_checkpoints import random_state_dict


def _default_precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "fp16"]
    return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]


def _time(model, x: torch.Tensor, device: torch.device, repeat: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    precisions = args.precisions.split(",") if args.precisions else _default_precisions(device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    reuse_freed_memory()
    with tempfile.TemporaryDirectory(prefix="pt2-bench-") as folder:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(folder) / "weights.pth")
            torch.save(random_state_dict(args.model, seed=0), checkpoint)
        plain = build_model(args.model, pretrained_from_file=checkpoint, progress=False).eval()
        size = args.size or plain.preprocessing.crop_size
        report = {"model": args.model, "device": str(device), "image_size": size, "torch": torch.__version__}
        report["threads"], report["modes"] = torch.get_num_threads(), {}
        models = {"eager plain fp32": plain.to(device)}
        for precision in precisions:
            path = Path(folder) / f"{precision}.pt2"
            result = export_pt2(plain, path, image_size=size, precision=precision, device=device)
            report[f"pt2 {precision}"] = {name: round(seconds, 2) for name, seconds in result.timings.items()}
            report[f"pt2 {precision}"]["checks"] = [
                {"batch": c.batch_size, "max_abs_diff": c.max_abs_diff, "logit_scale": c.logit_scale}
                for c in result.checks
            ]
            models[f"eager optimized {precision}"] = plain.optimize_for_inference(precision, reuse_memory=False)
            models[f"pt2 {precision}"] = torch._inductor.aoti_load_package(str(result.path))
            print(f"pt2 {precision}: {result.summary()}", file=sys.stderr, flush=True)
        check = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
        with torch.inference_mode():
            reference = plain(check).float()
            for mode, model in models.items():
                out = model(check).float()
                report["modes"][mode] = {
                    "max_abs_diff_vs_plain": (out - reference).abs().max().item(),
                    "top1_same": int((out.argmax(1) == reference.argmax(1)).sum()),
                    "seconds_per_batch": {b: [] for b in batches},
                }
            inputs = {b: torch.randn(b, 3, size, size).to(device) for b in batches}
            for x in inputs.values():  # warm-up: first calls allocate and pick algorithms
                for model in models.values():
                    model(x)
            for round_index in range(args.rounds):
                for b, x in inputs.items():
                    for mode, model in models.items():
                        seconds = _time(model, x, device, max(1, args.min_images // b))
                        report["modes"][mode]["seconds_per_batch"][b].append(seconds)
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for entry in report["modes"].values():
        entry["img_s"] = {b: round(b / min(samples), 2) for b, samples in entry["seconds_per_batch"].items()}
    return report


def print_table(report: dict) -> None:
    batches = list(next(iter(report["modes"].values()))["img_s"])
    header = ["mode", *[f"img/s b{b}" for b in batches], "max|diff| vs plain", "top-1 same"]
    size = f"{report['image_size']}x{report['image_size']}"
    print(f"{report['model']} {size} on {report['device']} ({report['threads']} threads), torch {report['torch']}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for mode, entry in report["modes"].items():
        speeds = [f"{entry['img_s'][b]:.2f}" for b in batches]
        parity = f"{entry['max_abs_diff_vs_plain']:.1e} | {entry['top1_same']}/4"
        print(f"| {mode} | " + " | ".join(speeds) + f" | {parity} |")
    for key, value in report.items():
        if key.startswith("pt2 "):
            times = ", ".join(f"{k} {v} s" for k, v in value.items() if k.endswith("_s"))
            print(f"{key}: {times}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pt2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seresnext26d_32x4d")
    parser.add_argument("--checkpoint", help="a weights file (default: random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", help="comma-separated (default: fp32 and the device's fast one)")
    parser.add_argument("--size", type=int, help="image size (default: the weights' crop size)")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-images", type=int, default=16, help="images per timed sample (small batches repeat)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
