"""The graph OpenVINO runs (models/openvino_runtime.py): rewritten in torch before conversion, the same function."""

from __future__ import annotations

import copy

import torch

from resnext_hub.models import build_model
from resnext_hub.models.fused import OptimizedResNet
from resnext_hub.models.openvino_runtime import _EarlyPooledBottleneck, _pool_early, _se_as_convs
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"


def test_pooling_the_se_before_conv3_and_its_layers_as_convs_keep_the_function():
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(random_state_dict(SMALL, seed=5))
    exact = OptimizedResNet(model.eval(), dtype=torch.float32, channels_last=False)
    rewritten = _se_as_convs(_pool_early(copy.deepcopy(exact)))
    blocks = [block for stage in rewritten.stages for block in stage]
    assert blocks and all(isinstance(block, _EarlyPooledBottleneck) for block in blocks)
    # The SE's first layer now reads conv3's input: half of its channels here.
    assert all(block.se_fc1.conv.in_channels == block.conv3.in_channels for block in blocks)
    x = torch.randn(3, 3, 64, 80)
    with torch.inference_mode():
        want, got = exact(x), rewritten(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max())
