"""The network as a backbone: timm's features_only and forward_intermediates, and a torchvision detector on it."""

from __future__ import annotations

import pytest
import timm
import torch

from resnext_hub.models import build_model
from resnext_hub.models.features import ResNetFeatures
from tools.fake_checkpoints import random_state_dict

TIMM_FAMILY = ["seresnext26d_32x4d", "seresnext26t_32x4d", "seresnext50_32x4d"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    paths = {}
    for name in TIMM_FAMILY:
        paths[name] = folder / f"{name}.pth"
        torch.save(random_state_dict(name, seed=11), paths[name])
    return paths


# Every stage of every stem and depth (out_indices None: all five), and the index choices on one of them: picking
# stages is the same code for every architecture.
CASES = [(name, None) for name in TIMM_FAMILY] + [(TIMM_FAMILY[0], i) for i in [(1, 3), (0, 4), (2,)]]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "out_indices"), CASES)
def test_features_only_equals_timm(checkpoints, name, out_indices):
    """Same weights in timm's features_only model and ours: same maps (<= 1e-4), same feature_info."""
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    ours = build_model(name, pretrained_from_file=checkpoints[name], features_only=True, **kwargs)
    theirs = timm.create_model(name, pretrained=False, features_only=True, **kwargs).eval()
    theirs.load_state_dict(torch.load(checkpoints[name]), strict=False)
    assert isinstance(ours, ResNetFeatures)
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    assert ours.feature_info.module_name() == theirs.feature_info.module_name()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4
    assert ours.classes == ours.meta.classes and ours.preprocessing.interpolation == "bicubic"


def test_features_keep_only_the_modules_they_need(checkpoints):
    backbone = build_model(
        TIMM_FAMILY[0], pretrained_from_file=checkpoints[TIMM_FAMILY[0]], features_only=True, out_indices=(1, 2)
    )
    names = {name for name, _ in backbone.named_children()}
    assert names == {"conv1", "bn1", "act1", "maxpool", "layer1", "layer2"}


@pytest.mark.slow
def test_forward_intermediates_of_the_nvidia_models():
    """The 101-layer models have no timm features_only twin: check against their own forward."""
    model = build_model("se_resnext101_32x4d", pretrained=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.extract_features(x)
        logits = model(x)
    assert [m.shape[1] for m in maps] == [64, 256, 512, 1024, 2048]
    for name, got in zip(["layer1", "layer2", "layer3", "layer4"], maps[1:]):
        assert torch.equal(got, features[name])
    assert torch.equal(model.forward_head(final), logits)
    with torch.no_grad():
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early, two = model.forward_intermediates(x, indices=[1, 2], stop_early=True)
    assert [m.shape[1] for m in only] == [1024, 2048]
    assert torch.equal(early, two[-1]) and early.shape[1] == 512


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"features_only": True, "out_indices": (5,)}, "out of range"),
        ({"features_only": True, "out_indices": (3, 1)}, "distinct and increasing"),
        ({"features_only": True, "out_indices": 0}, "last n"),
        ({"out_indices": (1,)}, "needs features_only=True"),
    ],
)
def test_bad_feature_arguments_are_refused_before_building(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("se_resnext101_32x4d", pretrained=True, **kwargs)


@pytest.mark.slow
def test_backbone_of_a_torchvision_faster_rcnn(checkpoints):
    """The README's recipe: the pretrained network under torchvision's FPN and Faster R-CNN (forward only)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    model = build_model(TIMM_FAMILY[0], pretrained_from_file=checkpoints[TIMM_FAMILY[0]])
    stages = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    backbone = BackboneWithFPN(model, stages, in_channels_list=[256, 512, 1024, 2048], out_channels=64)
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160).eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 120, 150), torch.rand(3, 140, 100)])
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    assert out[0]["boxes"].shape[1] == 4
