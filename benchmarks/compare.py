"""Issue 21's side-by-side table in one run: every precision against the best peer, end to end, cold start.

    .venv/bin/python -m benchmarks.compare                                  # SE-ResNeXt101-32x4d, batch 16
    .venv/bin/python -m benchmarks.compare --model seresnext26d_32x4d --rounds 3 --json compare.json

Three parts, each by the benchmark module that already measures it (nothing is timed twice):

1. model only (``benchmarks.inference``): NVIDIA's eager model (``plain``), ours per precision
   (``fp32`` in torch, ``fp32+openvino`` and ``bf16+openvino`` (our graph run by OpenVINO), ``bf16`` in torch,
   ``auto`` measured afresh, ``int8``) and the peers at
   their best configurations (``benchmarks.peers``: ONNX Runtime fp32; OpenVINO fp32/bf16/int8 with the
   latency hint and with throughput streams, the batch split across requests), round-robin, medians;
2. end to end (``benchmarks.end_to_end``): generated camera-size and small photos through the
   Engine at the default precision, as a share of the same round's model-only img/s;
3. cold start (``benchmarks.load_to_ready``): fresh processes, ours against NVIDIA's loading code.

Every figure is a ratio within this run (the machine may be shared: the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import end_to_end, inference, load_to_ready
from resnext_hub.models.cpu import cpu_has_native_bf16

OURS = {"fp32": ["fp32", "fp32+openvino"], "bf16": ["bf16", "bf16+openvino"], "int8": ["int8"]}
PEERS = {
    "fp32": ["ort-fp32", "ov-fp32", "ov-fp32+streams"],
    "bf16": ["ov-bf16", "ov-bf16+streams"],
    "int8": ["ov-int8", "ov-int8+streams"],
}
# Issue 21's goals: ours / the peer named, img/s at the batch size.
GOALS = {"fp32": ("ort-fp32", 1.0), "bf16": ("best", 1.0), "int8": ("best", 1.25)}
INT8_OVER_EAGER, INT8_COSINE = 5.0, 0.999
E2E_MODES = (
    "camera, fast decode",
    "small",
    "decode+preprocess 1 camera photo, fast",
    "decode+preprocess 1 small photo",
)


def model_only(args: argparse.Namespace) -> dict:
    """``benchmarks.inference``'s report for the modes of the table, at ``args.batch_size``."""
    modes = ["plain", *(m for ms in OURS.values() for m in ms), "auto", *(m for ms in PEERS.values() for m in ms)]
    if args.modes:
        modes = ["plain", *(m for m in args.modes.split(",") if m and m != "plain")]
    if not cpu_has_native_bf16():  # bf16 emulated is not a contender; auto's measurement shows it
        modes = [m for m in modes if "bf16" not in m]
    options = inference.main_parser().parse_args(
        [
            "--model", args.model, "--device", "cpu", "--modes", ",".join(modes),
            "--batch-sizes", str(args.batch_size), "--rounds", str(args.rounds), "--min-images", "1",
        ]
        + (["--profile", args.profile] if args.profile else [])
    )  # fmt: skip
    return inference.run(options)


def precision_rows(report: dict, batch: int) -> list[dict]:
    """Per precision: our best copy and the best peer (median img/s), their ratio and to NVIDIA's eager model."""
    modes = report["modes"]
    speed = {mode: entry["img_s_median"][batch] for mode, entry in modes.items()}
    eager = speed.get("plain")
    rows = []
    for precision, ours in OURS.items():
        ours = [m for m in ours if m in speed]
        peers = [m for m in PEERS[precision] if m in speed]
        if not ours:
            continue
        best = max(ours, key=speed.__getitem__)
        row = {"precision": precision, "ours": best, "ours_img_s": speed[best], "peers": {p: speed[p] for p in peers}}
        if eager:
            row["ours_over_eager"] = round(speed[best] / eager, 2)
        if peers:
            peer = max(peers, key=speed.__getitem__)
            row["best_peer"], row["ours_over_best_peer"] = peer, round(speed[best] / speed[peer], 3)
        against, goal = GOALS[precision]
        against = row.get("best_peer") if against == "best" else against
        if against in speed:
            row["goal"] = f"{best} / {against} >= {goal}"
            row["met"] = speed[best] / speed[against] >= goal
        if precision == "int8" and eager:
            row["cosine_photos"] = modes[best].get("cosine_photos")
            row["goal_eager"] = f">= {INT8_OVER_EAGER}x eager, cosine >= {INT8_COSINE}"
            row["met_eager"] = speed[best] / eager >= INT8_OVER_EAGER and (row["cosine_photos"] or 0) >= INT8_COSINE
        rows.append(row)
    if "auto" in speed and "fp32" in speed:
        rows.append(
            {
                "precision": f"auto ({modes['auto']['precision']}, {modes['auto'].get('backend', 'torch')})",
                "ours": "auto",
                "ours_img_s": speed["auto"],
                "ours_over_eager": round(speed["auto"] / eager, 2) if eager else None,
                "goal": "auto / fp32 >= 1.0",
                "met": speed["auto"] / speed["fp32"] >= 1.0,
            }
        )
    return rows


def print_precisions(rows: list[dict], report: dict, batch: int) -> None:
    print(f"\n## Model only, {report['model']}, batch {batch}, img/s (medians of {report['rounds']} rounds)")
    print("| precision | ours | img/s | x NVIDIA eager | best peer (img/s) | ours / best peer | goal | met |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peer = f"{row['best_peer']} ({row['peers'][row['best_peer']]:.2f})" if "best_peer" in row else "-"
        ratio = f"{row['ours_over_best_peer']:.2f}" if "ours_over_best_peer" in row else "-"
        met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
        print(
            f"| {row['precision']} | {row['ours']} | {row['ours_img_s']:.2f} | {row.get('ours_over_eager') or '-'} "
            f"| {peer} | {ratio} | {row.get('goal', '-')} | {met} |"
        )
        if "goal_eager" in row:
            met = "yes" if row["met_eager"] else "**no**"
            print(f"| int8 | | | | | | {row['goal_eager']} (cosine {row['cosine_photos']}) | {met} |")
    modes = report["modes"]
    eager = modes.get("plain", {}).get("img_s_median", {}).get(batch)
    print("\nEvery mode (img/s median, x NVIDIA eager, precision as run, logit cosine on the photos):")
    for mode, entry in modes.items():
        rate = entry["img_s_median"][batch]
        ratio = f"{rate / eager:.2f}" if eager else "-"
        print(f"  {mode:18} {entry['precision']:5} {rate:7.2f}  {ratio:>5}x  cos {entry.get('cosine_photos', '-')}")
    for mode, reason in report.get("skipped", {}).items():
        print(f"  skipped {mode}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="se_resnext101_32x4d")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="model-only rounds (each times every mode once)")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="end-to-end rounds (0: skip)")
    parser.add_argument("--count", type=int, default=64, help="photos of each size, end to end (several batches)")
    parser.add_argument("--cold-rounds", type=int, default=3, help="fresh processes per contender (0: skip)")
    parser.add_argument("--modes", help="model-only modes to run (default: all of the table's); plain is always run")
    parser.add_argument("--profile", metavar="MODES", help="where the time goes, for these model-only modes")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    results: dict = {"cpu": end_to_end.cpu_kind(), "model": args.model, "batch": args.batch_size}
    print(f"CPU: {results['cpu']}")
    print(f"load average at start: {os.getloadavg()}")
    report = model_only(args)
    report["rounds"] = args.rounds
    if args.json:  # the slowest part is kept even if a later one fails
        args.json.write_text(json.dumps({**results, "model_only": report}, indent=2, default=str) + "\n")
    rows = precision_rows(report, args.batch_size)
    print_precisions(rows, report, args.batch_size)
    results["model_only"], results["precisions"] = report, rows
    if "profile" in report:
        print(report["profile"])
    with tempfile.TemporaryDirectory(prefix="resnext-compare-") as tmp:
        checkpoint = str(load_to_ready.checkpoint_file(args.model, Path(tmp)))
        if args.e2e_rounds:
            e2e = argparse.Namespace(
                model=args.model, device="cpu", precision="auto", count=args.count,
                batch_size=args.batch_size, rounds=args.e2e_rounds,
            )  # fmt: skip
            print(f"\n## End to end, {args.count} generated photos of each size, default precision (auto)")
            e2e_rows, results["e2e_precision"] = end_to_end.end_to_end(e2e, Path(tmp), checkpoint, E2E_MODES)
            end_to_end.print_report(e2e_rows)
            results["end_to_end"] = e2e_rows
        if args.cold_rounds:
            print(f"\n## Cold start, {args.model} from a local file, {args.cold_rounds} fresh processes each")
            cold = load_to_ready.summary(load_to_ready.cold_start(args.model, checkpoint, args.cold_rounds))
            load_to_ready.print_summary(cold)
            results["cold_start"] = cold
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
