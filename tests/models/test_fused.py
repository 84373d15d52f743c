"""models/fused.py's oneDNN path: a conv with its ReLU (and residual sum) fused computes the plain ops' numbers.

Small layers at the shapes the network has (1x1, grouped 3x3, strided), channels-last, CPU. Whole-model
fidelity of the fused copy is tests/models/test_optimize.py's.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnext_hub.models import fused
from resnext_hub.models.fused import PointwiseConv, onednn_conv

needs_onednn = pytest.mark.skipif(fused._CONV_POINTWISE is None, reason="this torch build has no oneDNN conv op")

LAYERS = {
    "1x1": lambda: PointwiseConv(64, 32, 1, bias=True),
    "grouped 3x3": lambda: nn.Conv2d(64, 64, 3, padding=1, groups=32, bias=True),
    "strided grouped 3x3": lambda: nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=32, bias=True),
}


def layer_and_input(kind: str, dtype: torch.dtype, batch: int = 4, size: int = 28) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = LAYERS[kind]().eval().requires_grad_(False)
    conv.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, conv.in_channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    return conv, x


def packed(conv: nn.Conv2d) -> bool:
    holder = conv.__dict__.get("_packed_weight")
    return holder is not None and holder.tensor is not None


def fused_calls(run: Callable[[], torch.Tensor]) -> int:
    """How many oneDNN fused convolutions ``run`` made."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return sum(event.count for event in profile.key_averages() if "_convolution_pointwise" in event.key)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_relu_fused_is_bit_identical(kind, dtype):
    conv, x = layer_and_input(kind, dtype)
    reference = F.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    assert fused_calls(lambda: onednn_conv(conv, x, relu=True)) == 1, "the fused oneDNN path was not taken"
    got = onednn_conv(conv, x, relu=True)
    assert packed(conv) == (dtype == torch.bfloat16)  # fp32 weights are used as they are
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, reference)
    assert torch.equal(onednn_conv(conv, x), conv(x))  # no post-op: the conv alone


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_sum_and_relu(dtype):
    conv, x = layer_and_input("1x1", dtype)
    residual = torch.randn(4, 32, 28, 28).to(dtype).contiguous(memory_format=torch.channels_last)
    reference = F.relu(conv(x).float() + residual.float())
    assert fused_calls(lambda: onednn_conv(conv, x, residual=residual, relu=True)) == 1
    got = onednn_conv(conv, x, residual=residual, relu=True)
    # One rounding of the sum instead of two: within one bf16 step of the exact value, as the plain ops are.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), reference, atol=tolerance, rtol=tolerance)
    assert (got >= 0).all()
    residual_before = residual.clone()
    onednn_conv(conv, x, residual=residual)
    assert torch.equal(residual, residual_before), "the residual must not be written into"


@needs_onednn
def test_changed_weights_are_packed_again():
    conv, x = layer_and_input("grouped 3x3", torch.bfloat16)
    onednn_conv(conv, x, relu=True)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place: the same storage, a new version
    assert torch.equal(onednn_conv(conv, x, relu=True), F.relu(conv._conv_forward(x, conv.weight, conv.bias)))
    conv.weight = nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)  # another tensor
    assert torch.equal(onednn_conv(conv, x, relu=True), F.relu(conv._conv_forward(x, conv.weight, conv.bias)))


@needs_onednn
def test_weights_packed_for_one_shape_serve_every_shape():
    """Packed on the first batch's shape; a last, smaller batch or another image size gives the same numbers."""
    conv, x = layer_and_input("strided grouped 3x3", torch.bfloat16, batch=8, size=32)
    onednn_conv(conv, x, relu=True)
    for batch, size in ((1, 32), (3, 20), (8, 57)):
        other = torch.randn(batch, 64, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert torch.equal(onednn_conv(conv, other, relu=True), F.relu(conv(other)))


@needs_onednn
def test_a_used_layer_can_be_copied_and_saved():
    conv, x = layer_and_input("1x1", torch.bfloat16)
    expected = onednn_conv(conv, x, relu=True)
    assert packed(conv)
    clone = copy.deepcopy(conv)
    assert not packed(clone)  # oneDNN's opaque copy is not copied: the clone packs its own
    assert torch.equal(onednn_conv(clone, x, relu=True), expected)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(onednn_conv(loaded, x, relu=True), expected)
    assert pickle.loads(pickle.dumps(conv)).weight.shape == conv.weight.shape


def test_plain_ops_where_onednn_does_not_apply():
    """NCHW input, a traced graph: the plain conv and ReLU, nothing packed (other runtimes get plain ops)."""
    conv, x = layer_and_input("grouped 3x3", torch.bfloat16)
    nchw = x.contiguous()
    assert torch.equal(onednn_conv(conv, nchw, relu=True), F.relu(conv(nchw)))
    assert fused_calls(lambda: onednn_conv(conv, nchw, relu=True)) == 0
    assert not packed(conv)
    # check_trace=False: the check would run the function again in eager mode, which packs.
    traced = torch.jit.trace(lambda t: onednn_conv(conv, t, relu=True), (x,), check_trace=False)
    assert not packed(conv)
    assert "mkldnn" not in str(traced.graph)
    assert torch.equal(traced(x), F.relu(conv(x)))


@needs_onednn
def test_weights_made_in_inference_mode():
    """optimize_for_inference may run under torch.inference_mode: its tensors have no version counter."""
    with torch.inference_mode():
        conv, x = layer_and_input("1x1", torch.bfloat16)
        assert torch.equal(onednn_conv(conv, x, relu=True), F.relu(conv(x)))
        assert packed(conv)
