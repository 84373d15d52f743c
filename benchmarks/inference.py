"""Inference speed of the plain model, timm's, ONNX Runtime's, OpenVINO's and each ``optimize_for_inference`` mode.

Run from the repo root (a 101-layer model on a 2-core CPU takes 15-25 minutes with compile)::

    .venv/bin/python -m benchmarks.inference                       # all modes, batches 1, 16, 32
    .venv/bin/python -m benchmarks.inference --modes plain,fp32,auto --batch-sizes 1,16 --json out.json
    .venv/bin/python -m benchmarks.inference --profile auto+compile  # where the time goes
    .venv/bin/python -m benchmarks.inference --modes plain,fp32,int8,ort-fp32,ort-int8,ov-fp32,ov-int8 \\
        --batch-sizes 1,16 --profile int8,ov-int8

Everything runs in one process with the same weights (random, with realistic BatchNorm
statistics, unless ``--checkpoint`` names a real file); speed does not depend on the values.
The modes are timed round-robin (each round times every mode once per batch size), so a
neighbour process slowing the machine down hits every mode alike (in two groups: the plain and
timm baselines first, then ours, since ours tune the process's allocator; "plain+malloc" is the
plain model after that tuning); img/s is the best round,
the median is in the JSON. "peak+MB" is the most memory in use (C heap on CPU, CUDA allocator on GPU) above the
level before a timed call (activations, workspace); "wts MB" the weights' size; "held MB" what
loading the mode left in use (weights, pre-packed copies, compiled code, caches).

int8 modes (ours: ``int8``, ``int8+openvino``, ``int8+torchao``; peers: ``ort-int8``, ``ov-int8``, see
benchmarks/peers.py) calibrate on the shared photos mirrored and mirrored-and-cropped (10 images through
the model's preset; never the photos themselves), and "cos photos" is the logit cosine on the 5 photos.
A mode whose packages are not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from benchmarks.heap import HeapSampler
from benchmarks.peers import PEERS, PeerUnavailable, load_peer, openvino_profile
from resnext_hub.models import VARIANTS, build_model
from resnext_hub.models.cpu import cpu_has_int8_dot, cpu_has_native_bf16, reuse_freed_memory
from resnext_hub.models.fused import OptimizedResNet
from resnext_hub.models.openvino_runtime import openvino_float
from resnext_hub.models.quantize import calibration_batches
from resnext_hub.processing import load_image
from tools.fake_checkpoints import random_state_dict  # trained-like random weights
from tools.model_table import image_gflops

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODES = "plain,timm,fp32,auto,fp32+compile,auto+compile,int8,ort-fp32,ort-int8,ov-fp32,ov-int8"
BASELINES = ("plain", "timm", "plain+amp")
PHOTOS = sorted((ROOT / "assets" / "images").glob("*.[jp][pn]g"))


def timm_model(architecture: str) -> nn.Module:
    """timm's own ResNet class configured as ``architecture`` (for NVIDIA's: SE hidden width 16)."""
    from timm.layers import SEModule
    from timm.models.resnet import Bottleneck, ResNet

    config = VARIANTS[architecture]
    se = partial(SEModule, rd_channels=config.se_hidden) if config.se_hidden else SEModule
    stem = {"7x7": "", "deep": "deep", "tiered": "deep_tiered"}[config.stem]
    return ResNet(
        Bottleneck,
        list(config.layers),
        cardinality=config.groups,
        base_width=4,
        stem_width=32 if stem else 64,
        stem_type=stem,
        avg_down=config.avg_down,
        block_args={"attn_layer": se} if (config.se_hidden or config.se_reduction) else None,
    )


def calibration_images() -> list[Image.Image]:
    """The shared photos mirrored, and mirrored with a 70% centre crop: like the photos, never them."""
    images = []
    for path in PHOTOS:
        mirrored = ImageOps.mirror(load_image(str(path)))
        w, h = mirrored.size
        images += [mirrored, mirrored.crop((int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h)))]
    return images


def calibration_batch(model: nn.Module, size: int) -> torch.Tensor:
    """:func:`calibration_images` through the model's preset (the API's own path), at ``size``."""
    batch = torch.cat(calibration_batches(calibration_images(), model.preprocessing))
    return batch if batch.shape[-1] == size else F.interpolate(batch, size=(size, size), mode="bilinear")


def load_mode(mode: str, architecture: str, path: Path, device: torch.device, setup: dict) -> nn.Module:
    """Load the weights file and return the ready-to-call model of ``mode``."""
    precision, _, extra = mode.partition("+")  # "plain+malloc", "plain+amp": the plain model
    if precision == "timm":
        model = timm_model(architecture)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().to(device)
    model = build_model(architecture, pretrained_from_file=path, progress=False).to(device)
    if precision == "plain":
        return model
    if mode in PEERS:
        return load_peer(mode, model.eval(), setup["size"], setup["calibration"], setup["workdir"])
    if precision == "int8":  # int8+openvino, int8+torchao: that backend; int8: the default one
        backend = extra or "auto"
        return model.optimize_for_inference("int8", calibration=setup["calibration"], int8_backend=backend)
    if extra == "openvino":  # our graph run by OpenVINO in bf16 or fp32: auto's candidates
        exact = OptimizedResNet(model.eval(), dtype=torch.float32, channels_last=False)
        return openvino_float(exact, torch.randn(2, 3, setup["size"], setup["size"]), precision)
    # auto measures its candidates here again (its cached choice may be from another load or version).
    return model.optimize_for_inference(precision, compile=extra == "compile", remeasure=precision == "auto")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    # NVIDIA's users on a GPU run the plain model under fp16 autocast ("plain+amp").
    if mode.endswith("+amp"):
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x).float()
    return model(x)


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device) -> float:
    """Best of a few 2048^3 matmuls: the machine's practical GEMM peak for ``dtype``."""
    a = torch.randn(2048, 2048, device=device).to(dtype)
    b = torch.randn(2048, 2048, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def fidelity_batch(model: nn.Module, size: int, batch: int, device: torch.device) -> torch.Tensor:
    """The shared photos (preprocessed as the weights declare) topped up with random inputs."""
    transform = model.preprocessing
    photos = [transform(load_image(str(path))) for path in PHOTOS][:batch]
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(batch - len(photos), 3, size, size, generator=generator)
    if photos and photos[0].shape[-1] != size:
        photos = [F.interpolate(p[None], size=(size, size), mode="bilinear")[0] for p in photos]
    return torch.cat([torch.stack(photos), noise]).to(device) if photos else noise.to(device)


def measure(
    modes: list[str],
    models: dict[str, nn.Module],
    inputs: dict[int, torch.Tensor],
    report: dict,
    args: argparse.Namespace,
    path: Path,
    device: torch.device,
    sampler: HeapSampler | None,
    setup: dict,
) -> None:
    """Load each mode (timing load-to-ready), warm it up per batch size, then time rounds.

    A mode that cannot load here (a package not installed, int8 on a CPU without VNNI) is dropped
    from ``modes`` with its reason in ``report["skipped"]``.
    """
    first = torch.randn(1, 3, args.size, args.size, device=device)
    for mode in list(modes):
        gc.collect()
        synchronize(device)
        before = _memory_in_use(sampler, device)
        start = time.perf_counter()
        try:
            model = load_mode(mode, args.model, path, device, setup)
        except (PeerUnavailable, ImportError) as error:
            report["skipped"][mode] = str(error)
            modes.remove(mode)
            print(f"{mode}: skipped: {error}", file=sys.stderr, flush=True)
            continue
        with torch.inference_mode():
            call(model, first, mode)
        synchronize(device)
        ready = time.perf_counter() - start
        models[mode] = model
        weights_mb = sum(t.numel() * t.element_size() for t in _tensors(model)) / 2**20
        gc.collect()
        loaded_mb = (_memory_in_use(sampler, device) - before) / 2**20
        report["modes"][mode] = {
            "precision": getattr(model, "precision", "fp32"),
            "backend": getattr(model, "backend", "torch"),
            "load_to_ready_s": round(ready, 2),
            "weights_mb": round(weights_mb, 1),
            "model_mb": round(loaded_mb, 1),
            "samples_s": {b: [] for b in inputs},
            "warmup_s": {},
            "peak_extra_mb": 0.0,
        }
        print(f"{mode}: ready in {ready:.1f} s", file=sys.stderr, flush=True)
    with torch.inference_mode():
        for b, x in inputs.items():  # first call per batch size: compiled modes compile for this shape here
            for mode in modes:
                start = time.perf_counter()
                call(models[mode], x, mode)
                synchronize(device)
                report["modes"][mode]["warmup_s"][b] = round(time.perf_counter() - start, 2)
        for round_index in range(args.rounds):
            for b, x in inputs.items():
                repeat = max(1, args.min_images // b)
                for mode in modes:
                    entry = report["modes"][mode]
                    base = sampler.reset() if sampler else _cuda_reset(device)
                    start = time.perf_counter()
                    for _ in range(repeat):
                        call(models[mode], x, mode)
                    synchronize(device)
                    entry["samples_s"][b].append((time.perf_counter() - start) / repeat)
                    peak = (sampler.peak if sampler else torch.cuda.max_memory_allocated(device)) - base
                    entry["peak_extra_mb"] = round(max(entry["peak_extra_mb"], peak / 2**20), 1)
            print(f"{'/'.join(modes)}: round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    workdir = tempfile.TemporaryDirectory(prefix="resnext-bench-")
    path = Path(args.checkpoint) if args.checkpoint else Path(workdir.name) / "weights.pth"
    if not args.checkpoint:
        torch.save(random_state_dict(args.model), path)
    sampler = HeapSampler() if device.type == "cpu" else None
    report: dict = {
        "model": args.model,
        "weights": str(args.checkpoint or "random (realistic BN statistics)"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_int8_dot": cpu_has_int8_dot(),
        "image_size": args.size,
        "load_average_before": os.getloadavg(),
        "modes": {},
        "skipped": {},
    }
    models: dict[str, nn.Module] = {}
    inputs = {b: torch.randn(b, 3, args.size, args.size, device=device) for b in sizes}
    setup = {"size": args.size, "workdir": Path(workdir.name)}
    if any(m.startswith("int8") or m in PEERS for m in modes):
        setup["calibration"] = calibration_batch(build_model(args.model, pretrained=False), args.size)
    # What users of the plain model and of timm get is measured first, in the process as it
    # starts; optimize_for_inference then tunes glibc's allocator for the whole process, so
    # "plain+malloc" shows how much of our gain that part alone gives the plain model.
    baselines = [m for m in modes if m in BASELINES]
    ours = [m for m in modes if m not in baselines]
    if "plain" in modes and ours and device.type == "cpu":
        ours.insert(0, "plain+malloc")
    for group in (baselines, ours):
        if group is ours and device.type == "cpu":
            reuse_freed_memory()
        measure(group, models, inputs, report, args, path, device, sampler, setup)
    with torch.inference_mode():
        if args.fidelity and "plain" in models:
            b = 16 if 16 in sizes else sizes[-1]
            x = fidelity_batch(models["plain"], args.size, b, device)
            reference = call(models["plain"], x, "plain").double()
            for mode, model in models.items():
                logits = call(model, x, mode).double()
                report["modes"][mode]["cosine_min"] = round(F.cosine_similarity(logits, reference).min().item(), 6)
                photos = F.cosine_similarity(logits[: len(PHOTOS)], reference[: len(PHOTOS)]).min().item()
                report["modes"][mode]["cosine_photos"] = round(photos, 6)
                same = logits.argmax(1) == reference.argmax(1)
                report["modes"][mode]["top1_agree"] = f"{int(same.sum())}/{b}"
                report["modes"][mode]["top1_photos"] = f"{int(same[: len(PHOTOS)].sum())}/{min(b, len(PHOTOS))}"
                report["modes"][mode]["max_abs_diff"] = float(f"{(logits - reference).abs().max().item():.3g}")
    for entry in report["modes"].values():
        samples = entry.pop("samples_s")
        entry["img_s"] = {b: round(b / min(s), 2) for b, s in samples.items()}
        entry["img_s_median"] = {b: round(b / statistics.median(s), 2) for b, s in samples.items()}
        entry["latency_ms_b1"] = round(1000 * min(samples[1]), 1) if 1 in samples else None
    flops = image_gflops(models.get("plain") or build_model(args.model, pretrained=False), args.size)
    report["gflop_per_image"] = round(flops, 2)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    report["gemm_peak_gflops"] = {
        name: round(gemm_peak_gflops(dtype, device), 1)
        for name, dtype in dtypes.items()
        if (device.type == "cuda") == (name == "fp16") or name == "fp32"
    }
    report["load_average_after"] = os.getloadavg()
    if args.profile:
        x = inputs[16 if 16 in sizes else sizes[-1]]
        chosen = [mode for mode in args.profile.split(",") if mode in models]
        report["profile"] = "\n\n".join(f"profile of {mode}:\n" + profile(models[mode], mode, x) for mode in chosen)
    workdir.cleanup()
    return report


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    inner = getattr(model, "_orig_mod", model)
    return [*inner.parameters(), *inner.buffers()]


def _memory_in_use(sampler: HeapSampler | None, device: torch.device) -> int:
    return sampler.current() if sampler else torch.cuda.memory_allocated(device)


def _cuda_reset(device: torch.device) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def profile(model: nn.Module, mode: str, x: torch.Tensor) -> str:
    """torch.profiler's table of one call: which operators the remaining time goes to.

    OpenVINO modes (ours and the peer): OpenVINO's own per-node counters, summed by layer type.
    """
    if getattr(model, "backend", None) == "openvino":
        return openvino_profile(model.backend_model, x)
    if mode.startswith("ov-"):
        return openvino_profile(model.handle, x)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.inference_mode(), torch_profile(activities=activities) as prof:
        call(model, x, mode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def print_table(report: dict) -> None:
    modes = report["modes"]
    sizes = list(next(iter(modes.values()))["img_s"])
    plain = modes.get("plain")
    header = [
        "mode",
        "prec",
        "ready s",
        *[f"img/s b{b}" for b in sizes],
        "x plain",
        "b1 ms",
        "peak+MB",
        "wts MB",
        "held MB",
    ]
    header += ["cos min", "cos photos", "top1", "top1 photos"]
    rows = [header]
    for mode, entry in modes.items():
        ref = sizes[1] if len(sizes) > 1 else sizes[0]
        ratio = f"{entry['img_s'][ref] / plain['img_s'][ref]:.2f}" if plain else "-"
        rows.append(
            [mode, entry["precision"], str(entry["load_to_ready_s"]), *[str(entry["img_s"][b]) for b in sizes], ratio]
            + [
                str(entry["latency_ms_b1"]),
                str(entry["peak_extra_mb"]),
                str(entry["weights_mb"]),
                str(entry["model_mb"]),
            ]
            + [str(entry.get(key, "-")) for key in ("cosine_min", "cosine_photos", "top1_agree", "top1_photos")]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"{report['model']} on {report['device']} ({report['threads']} threads), {report['image_size']}px")
    print(f"load average before/after: {report['load_average_before']} / {report['load_average_after']}")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print(f"x plain: img/s ratio at batch {ref}; GFLOP per image {report['gflop_per_image']}")
    for name, peak in report["gemm_peak_gflops"].items():
        print(f"GEMM peak {name}: {peak} GFLOP/s -> limit {peak / report['gflop_per_image']:.1f} img/s")
    if plain and 16 in sizes:
        print("ratios: batch-16 throughput, batch-1 latency, against plain (and plain+malloc, timed in this group):")
        for mode in modes:
            if mode in BASELINES:
                continue
            speed = modes[mode]["img_s"][16] / plain["img_s"][16]
            latency = modes[mode]["latency_ms_b1"] / plain["latency_ms_b1"] if 1 in sizes else float("nan")
            same_group = modes[mode]["img_s"][16] / modes["plain+malloc"]["img_s"][16] if "plain+malloc" in modes else 0
            print(f"  {mode:13} {speed:5.2f}x throughput ({same_group:.2f}x plain+malloc), b1 latency {latency:.2f}x")
        print_targets(report, sizes)
    for mode, reason in report.get("skipped", {}).items():
        print(f"skipped {mode}: {reason}")
    if "profile" in report:
        print(report["profile"])


def print_targets(report: dict, sizes: list[int]) -> None:
    """Issue 14's targets, as measured in this run (ratios only)."""
    modes = report["modes"]

    def ratio(a: str, b: str) -> float | None:
        return modes[a]["img_s"][16] / modes[b]["img_s"][16] if a in modes and b in modes else None

    def show(what: str, value: float | None, goal: float, higher: bool = True) -> None:
        if value is None:
            print(f"  {what:44} not measured (mode missing)")
        else:
            met = value >= goal if higher else value <= goal
            print(f"  {what:44} {value:8.4f} (target {'>=' if higher else '<='} {goal}): {'met' if met else 'NOT met'}")

    print("targets (issue 14):")
    show("int8 / plain, img/s at batch 16", ratio("int8", "plain"), 5.0)
    show("int8 / ov-int8, img/s at batch 16", ratio("int8", "ov-int8"), 1.25)
    if 1 in sizes and "int8" in modes:
        latency = modes["int8"]["latency_ms_b1"] / modes["plain"]["latency_ms_b1"]
        show("int8 / plain, batch-1 latency", latency, 0.3, higher=False)
    show("fp32 / plain, img/s at batch 16", ratio("fp32", "plain"), 1.6)
    show("fp32 / ort-fp32, img/s at batch 16", ratio("fp32", "ort-fp32"), 1.0)
    show("int8 logit cosine on the photos vs plain", modes.get("int8", {}).get("cosine_photos"), 0.999)


def main_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark (``benchmarks.compare`` builds its model-only run with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="se_resnext101_32x4d", choices=sorted(VARIANTS))
    parser.add_argument("--checkpoint", help="a real checkpoint file (default: random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated (default {DEFAULT_MODES}); "
                        "also bf16, bf16+openvino, fp32+openvino, fp16, any +compile, the peers ov-bf16, ov-*+streams; "
                        "on CUDA +amp runs a mode under fp16 autocast")  # fmt: skip
    parser.add_argument("--batch-sizes", default="1,16,32")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each times every mode once)")
    parser.add_argument("--min-images", type=int, default=4, help="repeat small batches up to this many images")
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false")
    parser.add_argument("--profile", metavar="MODES", help="print where the time goes at batch 16 for these modes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(argv)
    if args.profile and not set(args.profile.split(",")) <= set(args.modes.split(",")):
        parser.error(f"--profile {args.profile}: that mode is not in --modes {args.modes}")
    report = run(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
