"""Load-to-ready time (also from process start, torch's import included) and peak RSS of a model from a local file.

    .venv/bin/python -m benchmarks.load_to_ready --architecture se_resnext101_32x4d [--checkpoint FILE]

Without --checkpoint, an NGC-layout file with random weights is written to a temporary
folder first (same size and key layout as NVIDIA's). Each measurement runs in a fresh
process so that the page cache is the only thing shared between runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.fake_checkpoints import NGC_FILES, write_ngc_file

ROOT = Path(__file__).resolve().parent.parent

# Run with the repo root as its working directory: ``python -c`` imports from there.
CHILD = """
import sys, time, json
process_start = time.perf_counter()  # before torch's own import: a fresh process's wait for its first logits

def high_water_mib():
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's across exec).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

import torch
baseline = high_water_mib()
from resnext_hub.models import build_model
start = time.perf_counter()
model = build_model({architecture!r}, pretrained_from_file={checkpoint!r})
ready = time.perf_counter() - start
with torch.inference_mode():
    model(torch.randn(1, 3, 224, 224))
first = time.perf_counter() - start
optional = ("torchvision", "onnx", "onnxruntime", "openvino", "nncf", "torchao")
heavy = sorted(name for name in optional if name in sys.modules)
print(json.dumps({{"load_to_ready_s": ready, "ready_plus_first_224_image_s": first,
                  "import_torch_to_first_logits_s": time.perf_counter() - process_start, "optional_imported": heavy,
                  "peak_rss_mib": high_water_mib(), "rss_after_import_torch_mib": baseline}}))
"""


def measure(architecture: str, checkpoint: str, repeats: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        code = CHILD.format(architecture=architecture, checkpoint=checkpoint)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.splitlines()[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="se_resnext101_32x4d")
    parser.add_argument("--checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            if args.architecture not in NGC_FILES:
                parser.error(f"--checkpoint is required for {args.architecture}")
            checkpoint = str(write_ngc_file(Path(tmp), args.architecture))
        runs = measure(args.architecture, checkpoint, args.repeats)
    imported = sorted({name for run in runs for name in run.pop("optional_imported")})
    print(f"optional packages imported: {', '.join(imported) or 'none'}")
    for key in runs[0]:
        values = sorted(run[key] for run in runs)
        print(f"{key:32} min {values[0]:8.2f}  median {values[len(values) // 2]:8.2f}")


if __name__ == "__main__":
    main()
