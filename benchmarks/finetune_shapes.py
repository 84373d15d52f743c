"""Fine-tuning from random weights on the generated shape set, in 1 and 2 processes: accuracy and time.

    .venv/bin/python -m benchmarks.finetune_shapes                     # both runs, the issue's settings
    .venv/bin/python -m benchmarks.finetune_shapes --nproc 2 --json results.json

The set is ``tools.shapes_dataset`` (circles, squares, triangles; random colours, sizes, positions
and backgrounds: shape decides), 280 training and 40 validation images per class at 80 px (960
images). Each run is ``python -m resnext_hub finetune DATA --model seresnext26d_32x4d
--no-pretrained --epochs 10 --image-size 64 --batch-size 16 --lr 1e-3``, alone or under
``torchrun --nproc_per_node=2`` (gloo on CPU), one thread per process (``--threads 0`` splits the
cores between the processes instead; on a machine shared with other jobs, 2 threads in one
process ran 5x slower here than 1: OpenMP's threads spin waiting on each other). Reported: the
last and best val top-1 (%), the training images/s and the wall time of the command (start-up
included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.shapes_dataset import write_shapes_dataset

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(data: Path, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    """One ``finetune`` command; its metrics and wall time."""
    options = ["--model", args.model, "--no-pretrained", "--epochs", str(args.epochs), "--image-size"]
    options += [str(args.image_size), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    options += ["--workers", str(args.workers), "--no-progress", "-o", str(out)]
    command = [sys.executable, "-m", "resnext_hub", "finetune", str(data), *options]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1"]
        command = [sys.executable, *launcher, "--master_port", str(_free_port()), *command[1:]]
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"finetune failed ({nproc} process(es)):\n{done.stderr[-3000:]}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "val_top1_last": history[-1]["val_top1"],
        "val_top1_best": max(r["val_top1"] for r in history),
        "val_top1_by_epoch": [round(r["val_top1"], 2) for r in history],
        "train_images_per_second": sum(r["images_per_second"] for r in history) / len(history),
        "seconds": seconds,
        "command": " ".join(command[command.index("-m") :]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", default="1,2", help="process counts to run, comma-separated")
    parser.add_argument("--model", default="seresnext26d_32x4d")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="global")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process (0: the cores / processes)")
    parser.add_argument("--train", type=int, default=280, help="training images per class")
    parser.add_argument("--val", type=int, default=40, help="validation images per class")
    parser.add_argument("--keep", help="write data and runs under this folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(args.keep or scratch)
        data = write_shapes_dataset(base / "shapes", train=args.train, val=args.val, size=80)
        results = []
        for nproc in (int(n) for n in args.nproc.split(",")):
            result = run(data, base / f"run_{nproc}p", nproc, args)
            results.append(result)
            print(
                f"{nproc} process(es): val top-1 {result['val_top1_last']:.1f}% (best {result['val_top1_best']:.1f}%) "
                f"in {result['seconds']:.0f} s, {result['train_images_per_second']:.1f} img/s; "
                f"by epoch {result['val_top1_by_epoch']}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
