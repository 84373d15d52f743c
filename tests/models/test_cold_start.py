"""Cold start: a model from a local checkpoint file does no initialisation work that the weights overwrite.

Building on the meta device once ran ``kaiming_normal_`` on placeholder weights; its meta kernel
(a ``torch._refs`` function) imports ``torch._dynamo``, about a second of a fresh process. Checked in
a fresh process: this test session imports torch._dynamo elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

CHILD = """
import json, sys
import torch
from resnext_hub.models import build_model
path = sys.argv[1]
model = build_model("seresnext26d_32x4d", pretrained_from_file=path)
hub = torch.hub.load(sys.argv[2], "seresnext26d_32x4d", source="local", pretrained_from_file=path)
with torch.inference_mode():
    logits = hub(torch.randn(1, 3, 64, 64))
state = torch.load(path, weights_only=True)
keys = ("conv1.0.weight", "fc.bias")
print(json.dumps({
    "dynamo": "torch._dynamo" in sys.modules,
    "loaded": all(torch.equal(m.state_dict()[k], state[k]) for m in (model, hub) for k in keys),
    "meta": any(t.is_meta for m in (model, hub) for t in [*m.parameters(), *m.buffers()]),
    "finite": bool(torch.isfinite(logits).all()),
}))
"""


def test_a_model_from_a_local_file_imports_no_dynamo(small_checkpoint):
    run = [sys.executable, "-c", CHILD, str(small_checkpoint), str(ROOT)]
    out = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    report = json.loads(out.splitlines()[-1])
    assert report == {"dynamo": False, "loaded": True, "meta": False, "finite": True}
