"""Building a model and running it imports none of the optional or export-only packages (load-to-ready)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a fresh interpreter

# What only export, int8, the web demo or the processing utilities' extras need.
HEAVY = ("torchvision", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "torchao", "timm", "triton")

CHILD = """
import json, sys
import torch
from resnext_hub.models import build_model
model = build_model("seresnext26d_32x4d", pretrained=False)
with torch.inference_mode():
    model(torch.randn(1, 3, 64, 64))
    model.optimize_for_inference("fp32")(torch.randn(1, 3, 64, 64))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_building_and_running_a_model_imports_nothing_optional():
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    assert "torch" in loaded and "resnext_hub" in loaded  # the probe saw the imports it should
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
