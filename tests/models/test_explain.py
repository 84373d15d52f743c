"""Explanation maps: the class activation map is Grad-CAM for these heads, on every fast copy, and it looks where
the class's evidence is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resnext_hub.models import HeadError, build_model
from resnext_hub.models.cpu import cpu_has_native_bf16
from tools.quadrant_patterns import fit_head, quadrant_batch, quadrant_mass

ARCH = "seresnext26d_32x4d"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def autograd_grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM as Selvaraju et al. define it: the maps weighted by their mean gradient, ReLU, then scaled to [0, 1]."""
    features = model.forward_features(x).detach().requires_grad_(True)
    scores = model.forward_head(features).gather(1, classes[:, None]).sum()
    (gradients,) = torch.autograd.grad(scores, features)
    cam = (gradients.mean((2, 3), keepdim=True) * features).sum(1).relu()
    peak = cam.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak, cam)  # no positive evidence: zeros


def test_the_class_activation_map_is_grad_cam(model, images):
    explained = model.explanation(images)
    assert explained.maps.shape == (2, 2, 2)  # 64 px: the feature grid is 2x2
    with torch.no_grad():
        assert torch.equal(explained.classes, model(images).argmax(1))
    for target in (None, [4, 9]):
        got = model.explanation(images, target)
        want = autograd_grad_cam(model, images, got.classes)
        assert want.amax() > 0  # some evidence to compare
        torch.testing.assert_close(got.maps, want, rtol=0, atol=1e-5)
        assert target is None or got.classes.tolist() == target
    assert model.explanation(images, torch.tensor(7)).classes.tolist() == [7, 7]
    assert model.explanation(images, np.array([2, 5])).classes.tolist() == [2, 5]


@pytest.mark.slow  # float64 convolutions have no fast CPU kernels (seconds even at 64 px)
def test_a_float64_model_gives_float64_maps(model):
    exact = build_model(ARCH, pretrained=False, num_classes=10).eval()
    exact.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = exact.double()
    got = exact.explanation(x, 3)
    assert got.maps.dtype == torch.float64
    torch.testing.assert_close(got.maps, autograd_grad_cam(exact, x, got.classes), rtol=0, atol=1e-12)


def test_maps_are_normalised_per_image_and_the_logits_are_the_models(model, images):
    explained = model.explanation(images)
    assert explained.maps.dtype == torch.float32
    assert torch.allclose(explained.maps.amax((1, 2)), torch.ones(2)) and explained.maps.min() >= 0
    with torch.no_grad():
        torch.testing.assert_close(explained.logits, model(images))
    # A class with no positive evidence anywhere gets a map of zeros, not NaN.
    head = nn.Linear(model.num_features, 2)
    with torch.no_grad():
        head.weight.fill_(-1.0)
    dark = build_model(ARCH, pretrained=False, num_classes=2).eval()
    dark.load_state_dict({**model.state_dict(), "fc.weight": head.weight, "fc.bias": head.bias})
    assert torch.equal(dark.explain(images), torch.zeros(2, 2, 2))


def test_the_fast_copies_give_the_same_maps(model, images):
    want = model.explain(images)
    torch.testing.assert_close(model.optimize_for_inference("fp32").explain(images), want, rtol=0, atol=1e-4)
    if cpu_has_native_bf16():
        fast = model.optimize_for_inference("bf16")
        got = fast.explanation(images)
        assert got.maps.dtype == torch.float32 and got.logits.dtype == torch.float32
        assert (got.maps - want).abs().max() < 0.1
        assert torch.nn.functional.cosine_similarity(got.maps.flatten(1), want.flatten(1)).min() > 0.99


@pytest.mark.slow  # imports torch.compile's machinery (seconds), though nothing is compiled: torch.compile is lazy
def test_the_compiled_copy_explains_with_its_network_uncompiled(model, images):
    compiled = model.optimize_for_inference("fp32", compile=True)
    torch.testing.assert_close(compiled.explain(images), model.explain(images), rtol=0, atol=1e-4)


def test_a_sigmoid_head_is_explained_like_its_linear_layer(model, images):
    sigmoid = build_model(ARCH, pretrained=False, num_classes=10).eval()
    sigmoid.load_state_dict(model.state_dict())
    sigmoid.fc = nn.Sequential(nn.Dropout(0.1), sigmoid.fc, nn.Sigmoid())
    torch.testing.assert_close(sigmoid.explain(images, 3), model.explain(images, 3))


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (lambda n: nn.Sequential(nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, 5)), "linear head"),
        (lambda n: nn.Sequential(nn.Linear(n, 5), nn.ReLU()), "linear head"),
        (lambda n: nn.Identity(), "linear head"),
    ],
)
def test_a_head_that_is_not_linear_is_a_clear_error(model, images, head, message):
    replaced = build_model(ARCH, pretrained=False, num_classes=10).eval()
    replaced.fc = head(replaced.num_features)
    with pytest.raises(HeadError, match=message):
        replaced.explain(images)
    with pytest.raises(HeadError, match=message):
        replaced.optimize_for_inference("fp32").explain(images)


def test_another_pooling_is_a_clear_error(images):
    pooled = build_model(ARCH, pretrained=False, num_classes=10, global_pool="max").eval()
    with pytest.raises(HeadError, match="global_pool='avg'"):
        pooled.explain(images)


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (10, ValueError, "out of range: the head has 10 classes"),
        ([1, 2, 3], ValueError, r"one class index, or 2 \(one per image\), got \(3,\)"),
        (1.5, TypeError, "integer class index.*got float"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer class index.*got Tensor of torch.float32"),
        (True, TypeError, "integer class index.*got bool"),
        ("cat", TypeError, "integer class index.*got str"),
    ],
)
def test_a_bad_target_says_what_is_expected(model, images, target, error, message):
    with pytest.raises(error, match=message):
        model.explain(images, target)


@pytest.mark.slow  # extracts features of 40 images and trains a head (a few seconds on 2 busy cores)
def test_the_map_falls_on_the_quadrant_that_holds_the_class_pattern():
    torch.manual_seed(0)
    model = build_model(ARCH, pretrained=False, num_classes=2).eval()
    train, classes, _ = quadrant_batch(24, 64, seed=0)
    fit_head(model, train, classes, steps=150)
    test, test_classes, quadrants = quadrant_batch(16, 64, seed=1)
    explained = model.explanation(test, test_classes)
    assert explained.maps.shape == (16, 2, 2)  # 64 px: one cell per quadrant
    assert (explained.logits.argmax(1) == test_classes).float().mean() >= 0.9
    shares = quadrant_mass(explained.maps, quadrants)
    assert shares.min() > 0.5 and shares.mean() > 0.7, shares
