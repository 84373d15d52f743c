"""Cold start from a local file: process start to first logits, and peak RSS, ours against the baseline's code.

    .venv/bin/python -m benchmarks.load_to_ready --architecture se_resnext101_32x4d [--checkpoint FILE] [--rounds 3]

Without --checkpoint, a file with random weights is written to a temporary folder first (for
NVIDIA's two models an NGC-layout file: same size and key layout as NVIDIA's). Every measurement
is a fresh process (the page cache is the only thing shared), and the contenders run round-robin,
one process each per round, so a neighbour slowing the machine down hits them alike:

- ``ours``: ``torch.hub.load(<this repo>, <entry>, source="local", pretrained_from_file=FILE)``.
- ``nvidia``: NVIDIA's loading code path (``EntryPoint.__call__`` in DeepLearningExamples'
  ``PyTorch/Classification/ConvNets/image_classification/models/model.py``): build the network on the
  CPU with its initialisation, ``torch.load`` the whole file, rename the keys, ``load_state_dict``
  (a copy). NVIDIA's package is not installed here, so the network is this repository's class, built
  as NVIDIA's code builds its own (same layers, shapes and parameters; NVIDIA's modules import only
  torch and the standard library). For NVIDIA's two architectures only.
- ``timm``: timm's ``ResNet`` configured as the architecture (as tests/reference.py does for
  NVIDIA's, SE width 16), built the same way; it includes importing timm (which imports torchvision).

Each child reports the time from its start (before ``import torch``) to the first logits of one
224x224 image; within it, from ``import torch`` done to the model ready (the model code's imports
included; also as CPU time, user + system, which a loaded machine inflates least) and the first
forward; and ``VmHWM`` (its own peak RSS). On a machine others load, the first forward (hundreds of
small parallel ops, each a synchronisation of torch's threads) varies by seconds from run to run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.fake_checkpoints import NGC_FILES, random_state_dict, write_ngc_file

ROOT = Path(__file__).resolve().parent.parent

_PROLOGUE = """
import sys, time, json
process_start = time.perf_counter()  # before torch's own import: a fresh process's wait for its first logits

def high_water_mib():
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's across exec).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

import torch
torch_imported, torch_cpu = time.perf_counter(), time.process_time()
"""

_EPILOGUE = """
ready, ready_cpu = time.perf_counter(), time.process_time()
with torch.inference_mode():
    model(torch.randn(1, 3, 224, 224))
done = time.perf_counter()
print(json.dumps({{"start_to_logits_s": done - process_start, "ready_s": ready - torch_imported,
                  "ready_cpu_s": ready_cpu - torch_cpu, "first_logits_s": done - ready, "cpu_s": time.process_time(),
                  "peak_rss_mib": high_water_mib(), "dynamo_imported": "torch._dynamo" in sys.modules}}))
"""

CHILDREN = {
    "ours": """
model = torch.hub.load({root!r}, {entry!r}, source="local", pretrained_from_file={checkpoint!r})
""",
    "nvidia": """
from resnext_hub.models import VARIANTS, ResNet
from resnext_hub.models.checkpoint import canonical_keys
model = ResNet(VARIANTS[{architecture!r}], 1000).eval()  # on the CPU, initialised, as NVIDIA's constructor
state_dict = torch.load({checkpoint!r}, map_location=torch.device("cpu"))
model.load_state_dict(canonical_keys(state_dict))  # NVIDIA's code renames (remap_fn, reshape) then copies
""",
    "timm": """
import timm
if {architecture!r} in {ngc!r}:  # NVIDIA's architecture, as tests/reference.py configures timm's class
    from functools import partial
    from timm.layers import SEModule
    from timm.models.resnet import Bottleneck, ResNet
    se = {{"attn_layer": partial(SEModule, rd_channels=16)}} if {architecture!r}.startswith("se_") else {{}}
    model = ResNet(Bottleneck, [3, 4, 23, 3], cardinality=32, base_width=4, block_args=se).eval()
else:
    model = timm.create_model({architecture!r}).eval()
state_dict = torch.load({checkpoint!r}, map_location=torch.device("cpu"))
renamed = {{}}
for key, value in state_dict.items():  # NGC's names to timm's (tests/reference.py's rules); timm's stay
    key = key.replace(".squeeze.squeeze.", ".se.fc1.").replace(".squeeze.expand.", ".se.fc2.")
    renamed[key] = value[:, :, None, None] if ".se.fc" in key and key.endswith("weight") and value.dim() == 2 else value
model.load_state_dict(renamed)
""",
}


def entry_for(architecture: str) -> str:
    """The hub entry point that builds ``architecture``."""
    from resnext_hub.models import hub_entries

    entries = hub_entries()
    return architecture if architecture in entries else f"nvidia_{architecture}"


def contenders(architecture: str) -> list[str]:
    """Ours and the baselines that apply: NVIDIA's code path for NVIDIA's two models, timm's for all."""
    return ["ours", *(["nvidia"] if architecture in NGC_FILES else []), "timm"]


KEYS = ("start_to_logits_s", "ready_s", "ready_cpu_s", "first_logits_s", "cpu_s", "peak_rss_mib")
RATIOS = {"start_to_logits_s": "start to logits", "ready_s": "ready", "ready_cpu_s": "ready CPU", "peak_rss_mib": "RSS"}


def run_child(name: str, architecture: str, checkpoint: str) -> dict:
    code = _PROLOGUE + CHILDREN[name].format(
        root=str(ROOT),
        entry=entry_for(architecture),
        architecture=architecture,
        checkpoint=checkpoint,
        ngc=sorted(NGC_FILES),
    )
    code += _EPILOGUE.format()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def cold_start(architecture: str, checkpoint: str, rounds: int, names: list[str] | None = None) -> dict[str, list]:
    """Runs of each contender, round-robin (one fresh process each per round), after one unmeasured warm-up each."""
    names = names or contenders(architecture)
    for name in names:  # the page cache holds the file and the libraries for every measured run
        run_child(name, architecture, checkpoint)
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            runs[name].append(run_child(name, architecture, checkpoint))
    return runs


def checkpoint_file(architecture: str, folder: Path) -> Path:
    """A random-weights file for ``architecture``: NGC's layout for NVIDIA's models, else timm's."""
    if architecture in NGC_FILES:
        return write_ngc_file(folder, architecture)
    import torch

    path = folder / f"{architecture}.pth"
    torch.save(random_state_dict(architecture), path)
    return path


def summary(runs: dict[str, list]) -> list[dict]:
    """Per contender: median seconds and peak RSS, and the per-round ratios to ours (median)."""
    rows = []
    for name, measured in runs.items():
        row = {"contender": name, "rounds": len(measured)}
        for key in KEYS:
            row[key] = round(statistics.median(run[key] for run in measured), 3)
            row[f"ours_over_{key}"] = round(
                statistics.median(ours[key] / run[key] for ours, run in zip(runs["ours"], measured)), 3
            )
        row["dynamo_imported"] = any(run["dynamo_imported"] for run in measured)
        rows.append(row)
    return rows


def print_summary(rows: list[dict]) -> None:
    print(
        "| contender | start to logits s | ready s (CPU s) | first logits s | peak RSS MiB | ours / it: "
        + ", ".join(RATIOS.values())
        + " |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratios = ", ".join(f"{row[f'ours_over_{key}']:.2f}" for key in RATIOS)
        print(
            f"| {row['contender']} | {row['start_to_logits_s']:.2f} | {row['ready_s']:.2f} ({row['ready_cpu_s']:.2f}) "
            f"| {row['first_logits_s']:.2f} | {row['peak_rss_mib']:.0f} | {ratios} |"
        )
    imported = ", ".join(f"{row['contender']} {'yes' if row['dynamo_imported'] else 'no'}" for row in rows)
    print("(medians over the rounds; ratios per round, then the median. ready: from torch imported to the model")
    print(" loaded, the model code's imports included; first logits: one 224x224 image after that, the same network")
    print(f" for ours and NVIDIA's path; torch._dynamo imported: {imported})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="se_resnext101_32x4d")
    parser.add_argument("--checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(checkpoint_file(args.architecture, Path(tmp)))
        print_summary(summary(cold_start(args.architecture, checkpoint, args.rounds)))


if __name__ == "__main__":
    main()
