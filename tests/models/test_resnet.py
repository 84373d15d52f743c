"""The model is NVIDIA's function: parameter counts, parity with an independent reference."""

from __future__ import annotations

import logging

import pytest
import torch
from reference import reference_from_ngc_file

from resnext_hub.models import VARIANTS, build_model
from tools.fake_checkpoints import NGC_FILES

EXPECTED_PARAMS = {
    "resnext101_32x4d": 44_177_704,
    "se_resnext101_32x4d": 45_251_128,
    "seresnext26d_32x4d": 16_809_512,
    "seresnext26t_32x4d": 16_806_976,
    "seresnext50_32x4d": 27_559_896,
}


@pytest.mark.parametrize("architecture", sorted(VARIANTS))
def test_parameter_counts(architecture):
    with torch.device("meta"):
        model = build_model(architecture, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[architecture]


@pytest.fixture(scope="module", params=sorted(NGC_FILES))
def loaded_pair(request, ngc_dir):
    architecture = request.param
    path = ngc_dir / NGC_FILES[architecture]
    ours = build_model(architecture, pretrained_from_file=path)
    return architecture, ours, reference_from_ngc_file(path, architecture)


@pytest.mark.slow
def test_logits_match_reference(loaded_pair):
    architecture, ours, reference = loaded_pair
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    assert expected.abs().max() > 0.05, "reference output is degenerate; the comparison would be vacuous"
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_channels_last_and_unfused_se_give_same_logits(loaded_pair, ngc_dir):
    architecture, ours, _ = loaded_pair
    path = ngc_dir / NGC_FILES[architecture]
    variant = build_model(architecture, pretrained_from_file=path, channels_last=True, fused_se=False)
    assert variant.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x)
        got = variant(x.contiguous(memory_format=torch.channels_last))
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_extract_features_matches_forward(loaded_pair):
    _, ours, _ = loaded_pair
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = ours.extract_features(x)
        logits = ours(x)
        only_layer2 = ours.extract_features(x, layers=["layer2"])
    assert list(features) == ["layer1", "layer2", "layer3", "layer4", "classifier"]
    assert [tuple(features[f"layer{i}"].shape[1:]) for i in range(1, 5)] == [
        (256, 16, 16),
        (512, 8, 8),
        (1024, 4, 4),
        (2048, 2, 2),
    ]
    assert torch.equal(features["classifier"], logits)
    assert list(only_layer2) == ["layer2"] and torch.equal(only_layer2["layer2"], features["layer2"])
    with pytest.raises(ValueError, match="unknown layers.*'layer5'"):
        ours.extract_features(x, layers=["layer5"])


@pytest.mark.slow
def test_new_num_classes_keeps_backbone_and_logs(ngc_dir, caplog):
    path = ngc_dir / NGC_FILES["resnext101_32x4d"]
    with caplog.at_level(logging.INFO):
        model = build_model("resnext101_32x4d", pretrained_from_file=path, num_classes=10)
    assert model.fc.out_features == 10 and not model.fc.weight.is_meta
    assert "fc is freshly initialised" in caplog.text
    reference = torch.load(path, weights_only=True)
    assert torch.equal(model.layer4[2].conv3.weight, reference["layer4.2.conv3.weight"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_random_init_without_weights():
    model = build_model("seresnext26d_32x4d", pretrained=False, num_classes=7)
    assert model.weights_record is None and not model.training
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_num_classes_is_a_clear_error(bad):
    # 0 is timm's "no classifier" (tests/models/test_timm_api.py)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0: no classifier, pooled features\)"):
        build_model("seresnext26d_32x4d", pretrained=False, num_classes=bad)
