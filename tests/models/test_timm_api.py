"""timm's model API on our models, with timm's meanings (issue 22, item 1), checked against the installed timm.

The reference is timm itself: the same weights in ``timm.create_model(name)`` (loaded from the same file through
timm's own loader, ``pretrained_cfg_overlay=dict(file=...)``, which also applies timm's ``in_chans`` adaptation
and drops the classifier for ``num_classes=0``), logits within 1e-4. The small model ``seresnext26d_32x4d``
with random weights and trained-like BatchNorm statistics, at 64-96 px; NVIDIA's models only where a property
needs them (their ``pretrained_cfg`` and parameter groups: no forward pass, built on the meta device).
"""

from __future__ import annotations

import math
import weakref

import pytest
import timm
import timm.data
import timm.optim
import torch
from conftest import RGB_PHOTOS
from PIL import Image
from reference import timm_nvidia_model
from timm.models import group_parameters
from timm.models._manipulate import adapt_input_conv as timm_adapt_input_conv
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hubconf
from resnext_hub.models import ModelMeta, ResNet, build_model, get_weights
from resnext_hub.models.input_conv import adapt_input_conv
from resnext_hub.models.pooling import POOL_TYPES
from resnext_hub.models.pretrained_cfg import crop_pct
from resnext_hub.models.variants import get_config
from resnext_hub.processing import ClassList, ImageClassification
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"
TOLERANCE = 1e-4
TIMM_FAMILY = ("seresnext26d_32x4d", "seresnext26t_32x4d", "seresnext50_32x4d")
NVIDIA = ("resnext101_32x4d", "se_resnext101_32x4d")
# timm's pretrained_cfg keys that say how to feed the weights and what they are.
CFG_KEYS = (
    "url",
    "hf_hub_id",
    "architecture",
    "tag",
    "input_size",
    "test_input_size",
    "interpolation",
    "crop_pct",
    "test_crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "license",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """seresnext26d_32x4d weights in timm's layout; a wide random head spreads the logits."""
    state = random_state_dict(SMALL, seed=3)
    state["fc.weight"] = torch.rand(state["fc.weight"].shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    path = tmp_path_factory.mktemp("timm_api") / f"{SMALL}.pth"
    torch.save(state, path)
    return path


def timm_twin(path, name: str = SMALL, **kwargs) -> nn.Module:
    """timm's model of ``name`` with the weights in ``path``, loaded and adapted by timm's own loader."""
    overlay = {"file": str(path)}
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def inputs(channels: int = 3, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, 64, 80, generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= TOLERANCE, f"max |diff| {diff:.3g} > {TOLERANCE}"


# -- forward_features / forward_head / get_classifier / reset_classifier ----------------------------------


def test_forward_features_and_head_equal_timms(weights):
    ours, theirs = hubconf.seresnext26d_32x4d(pretrained_from_file=weights), timm_twin(weights)
    x = inputs()
    with torch.no_grad():
        features, want_features = ours.forward_features(x), theirs.forward_features(x)
        logits = theirs(x)
        # The comparison can fail: the two images' logits are far apart.
        assert (logits[0] - logits[1]).abs().max().item() > 100 * TOLERANCE
        close(features, want_features)
        assert features.shape == (2, 2048, 2, 3)  # unpooled
        close(ours.forward_head(features, pre_logits=True), theirs.forward_head(want_features, pre_logits=True))
        close(ours.forward_head(features), logits)
        close(ours(x), logits)
    assert ours.num_features == theirs.num_features == 2048
    assert ours.head_hidden_size == theirs.head_hidden_size
    assert ours.get_classifier() is ours.fc and ours.get_classifier(name_only=True) == "fc"


def test_num_classes_0_gives_pooled_features_as_timms(weights):
    ours = build_model(SMALL, pretrained_from_file=weights, num_classes=0)
    theirs = timm_twin(weights, num_classes=0)
    assert isinstance(ours.fc, nn.Identity) and ours.num_classes == 0
    x = inputs()
    with torch.no_grad():
        pooled = ours(x)
        assert pooled.shape == (2, ours.num_features)
        close(pooled, theirs(x))
    assert ours.meta.classes == get_weights(SMALL).class_list


def test_reset_classifier_0_and_back(weights):
    model = build_model(SMALL, pretrained_from_file=weights)
    x = inputs()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        assert torch.equal(model(x), pooled)
        model.reset_classifier(0, "")  # timm's: no pooling either, the maps themselves
        assert torch.equal(model(x), features)
        model.reset_classifier(5, "avg", classes=ClassList.of("abcde"))
        assert model.fc.in_features == 2048 and model(x).shape == (2, 5)
    assert model.classes.names == tuple("abcde") and not model.fc.training  # the head follows eval mode


# -- global_pool -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_global_pool_logits_equal_timms(weights, pool):
    ours = build_model(SMALL, pretrained_from_file=weights, global_pool=pool)
    theirs = timm_twin(weights, global_pool=pool)
    with torch.no_grad():
        close(ours(inputs()), theirs(inputs()))


@pytest.mark.parametrize("pool", [p for p in POOL_TYPES if p])
def test_every_pool_type_pools_as_timms(pool):
    """Same maps in, same pooled features out, same widths (``num_features``: unpooled; ``head_hidden_size``)."""
    ours = build_model(SMALL, pretrained=False, global_pool=pool)
    theirs = timm.create_model(SMALL, pretrained=False, global_pool=pool).eval()
    maps = torch.randn(2, 2048, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(ours.forward_head(maps, pre_logits=True), theirs.forward_head(maps, pre_logits=True))
    assert ours.num_features == theirs.num_features
    assert ours.head_hidden_size == theirs.head_hidden_size == ours.fc.in_features == theirs.fc.in_features


def test_no_pooling_needs_no_head():
    model = build_model(SMALL, pretrained=False, num_classes=0, global_pool="")
    with torch.no_grad():
        assert model(inputs()).shape == (2, 2048, 2, 3)
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling\) needs num_classes=0"):
        build_model(SMALL, pretrained=False, global_pool="")


# -- in_chans -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("shape", [(32, 3, 3, 3), (64, 3, 7, 7)])
def test_adapt_input_conv_equals_timms(in_chans, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(in_chans))
    want = timm_adapt_input_conv(in_chans, weight.clone())
    assert torch.equal(adapt_input_conv(in_chans, weight), want)
    half = weight.half()
    assert torch.equal(adapt_input_conv(in_chans, half), timm_adapt_input_conv(in_chans, half.clone()))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_from_pretrained_weights_equals_timms(weights, in_chans):
    ours = build_model(SMALL, pretrained_from_file=weights, in_chans=in_chans)
    theirs = timm_twin(weights, in_chans=in_chans)
    assert ours.conv1[0].in_channels == in_chans
    assert torch.equal(ours.conv1[0].weight, theirs.conv1[0].weight)
    with torch.no_grad():
        close(ours(inputs(in_chans)), theirs(inputs(in_chans)))
    assert ours.pretrained_cfg["first_conv"] == theirs.pretrained_cfg["first_conv"] == "conv1.0"


def test_in_chans_with_random_weights():
    model = build_model("seresnext50_32x4d", pretrained=False, in_chans=1, num_classes=4)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(inputs(1)).shape == (2, 4)


# -- drop_rate / drop_path_rate ----------------------------------------------------------------------------


def test_drop_path_rates_rise_per_block_as_timms():
    ours = build_model("seresnext50_32x4d", pretrained=False, drop_path_rate=0.2)
    theirs = timm.create_model("seresnext50_32x4d", pretrained=False, drop_path_rate=0.2)

    def rates(model: nn.Module) -> list[float]:
        blocks = [block for i in range(1, 5) for block in getattr(model, f"layer{i}")]
        # timm's DropPath holds its rate as drop_prob, ours as p; no module: rate 0
        return [getattr(b.drop_path, "drop_prob", getattr(b.drop_path, "p", 0.0)) for b in blocks]

    want = rates(theirs)
    assert len(want) == 16 and want[0] == 0.0 and want[-1] == pytest.approx(0.2)
    assert rates(ours) == pytest.approx(want, abs=1e-12)


def test_drop_rates_in_training_draw_as_timms_and_vanish_in_eval(weights):
    """Training mode, same seed: timm's and our dropout and drop path drop the same samples; eval: no change."""
    options = {"drop_rate": 0.3, "drop_path_rate": 0.25}
    ours = build_model(SMALL, pretrained_from_file=weights, **options)
    theirs = timm_twin(weights, **options)
    plain = build_model(SMALL, pretrained_from_file=weights)
    x = inputs(batch=4)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))  # eval: the identity
        ours.train(), theirs.train()
        torch.manual_seed(7)
        got = ours(x)
        torch.manual_seed(7)
        want = theirs(x)
        close(got, want)
        torch.manual_seed(8)
        assert (ours(x) - got).abs().max().item() > 100 * TOLERANCE  # another draw drops other paths


# -- gradient checkpointing ----------------------------------------------------------------------------------


class PeakTensorMemory(TorchDispatchMode):
    """The peak of bytes held by tensors created while it is active (forward, recomputation and backward).

    Every op's outputs pass through here (``TorchDispatchMode`` sees the autograd engine's backward ops
    too); a new storage counts from its creation until torch frees it (a finalizer on the storage,
    which torch keeps alive exactly as long as the memory). Views and in-place results share a storage
    already counted (or one that existed before, such as the weights) and add nothing. Unlike the
    process's resident memory (allocator caching) or tracemalloc (blind to torch's C++ allocations),
    this counts exactly the tensors torch holds at each step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.counted.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in given or key in self.counted:
                continue
            self.counted.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out


def _training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """One loss and backward in training mode: (loss, peak bytes of the tensors it created).

    The gradients exist (zeros) beforehand, so the peak is the activations' (and the transient
    gradients'), the part checkpointing changes, not the parameter gradients themselves.
    """
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    meter = PeakTensorMemory()
    with meter:
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        value = loss.item()
        del loss
    return value, meter.peak


def test_grad_checkpointing_same_loss_and_gradients_less_memory(weights):
    plain = build_model(SMALL, pretrained_from_file=weights).train()
    checkpointed = build_model(SMALL, pretrained_from_file=weights).train()
    checkpointed.set_grad_checkpointing()
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    x, target = inputs(seed=5) * 2, torch.tensor([3, 999])
    loss, plain_peak = _training_step(plain, x, target)
    checkpointed_loss, checkpointed_peak = _training_step(checkpointed, x, target)
    assert abs(checkpointed_loss - loss) <= 1e-6
    grads = dict(plain.named_parameters())
    worst = max((p.grad - grads[n].grad).abs().max().item() for n, p in checkpointed.named_parameters())
    assert worst <= 1e-6
    assert max(p.grad.abs().max().item() for p in plain.parameters()) > 1e-3  # gradients that could differ
    # The recomputation does not update BatchNorm's running statistics a second time.
    buffers = dict(plain.named_buffers())
    for name, buffer in checkpointed.named_buffers():
        assert torch.allclose(buffer.double(), buffers[name].double(), rtol=0, atol=1e-6), name
    assert plain.layer1[0].bn1.num_batches_tracked.item() == 1001
    # Measured: about 23.5 MB without, 13.3 MB with (2 images at 64x80 px).
    assert checkpointed_peak < 0.75 * plain_peak, (checkpointed_peak, plain_peak)


def test_grad_checkpointing_off_without_autograd(weights):
    """Inference (no grad) runs the plain path: same logits, nothing recomputed."""
    model = build_model(SMALL, pretrained_from_file=weights)
    with torch.no_grad():
        want = model(inputs())
        model.set_grad_checkpointing()
        assert torch.equal(model(inputs()), want)
        model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


# -- group_matcher / no_weight_decay: timm's optimizer factory --------------------------------------------


def _groups(model: nn.Module) -> list[tuple[float, float, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    return [
        (g["lr_scale"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("name", ["seresnext26d_32x4d", "se_resnext101_32x4d"])
def test_layer_decay_groups_equal_timms(name):
    with torch.device("meta"):  # parameter names and shapes only
        ours = build_model(name, pretrained=False)
        theirs = timm_nvidia_model(name) if name in NVIDIA else timm.create_model(name, pretrained=False)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    want = _groups(theirs)
    assert len(want) > 10 and len({scale for scale, _, _ in want}) > 5  # layer decay did group
    assert _groups(ours) == want
    for coarse in (False, True):
        assert group_parameters(ours, ours.group_matcher(coarse)) == group_parameters(
            theirs, theirs.group_matcher(coarse)
        )
    assert ours.no_weight_decay() == set()


# -- pretrained_cfg: timm's data pipeline gives each weight's real preprocessing ------------------------


@pytest.fixture(scope="module")
def described():
    """Every architecture, built for its default weights without loading them (on the meta device)."""
    with torch.device("meta"):
        return {name: build_model(name, pretrained=False) for name in (*NVIDIA, *TIMM_FAMILY)}


@pytest.mark.parametrize("name", TIMM_FAMILY)
def test_pretrained_cfg_of_timms_weights_is_timms(described, name):
    model = described[name]
    assert model.weights_record is None  # not loaded: the record still describes the model
    want = timm.create_model(name, pretrained=False).pretrained_cfg
    got = model.pretrained_cfg
    assert {k: got.get(k) for k in CFG_KEYS} == {k: want.get(k) for k in CFG_KEYS}
    assert model.default_cfg == got
    config = timm.data.resolve_model_data_config(model)
    assert config["interpolation"] == "bicubic" and config["input_size"] == (3, 224, 224)
    assert config["crop_pct"] == 0.875
    test = timm.data.resolve_model_data_config(model, use_test_size=True)
    assert test["input_size"] == (3, 288, 288) and test["crop_pct"] == 0.95


@pytest.mark.parametrize("name", NVIDIA)
def test_pretrained_cfg_of_nvidias_weights_is_bilinear_256_224(described, name):
    cfg = described[name].pretrained_cfg
    assert cfg["architecture"] == name and cfg["tag"] == "ngc_20.06"
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc" and cfg["num_classes"] == 1000
    assert "hf_hub_id" not in cfg and "test_input_size" not in cfg  # NVIDIA publishes neither
    assert timm.data.resolve_model_data_config(described[name]) == {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def test_pretrained_cfg_describes_the_weights_not_a_replaced_head(described):
    """As timm's: ``num_classes`` and the input stay the weights' whatever head or input channels the model has."""
    with torch.device("meta"):
        model = build_model(SMALL, pretrained=False, num_classes=0, in_chans=1)
    assert model.pretrained_cfg == described[SMALL].pretrained_cfg


def _timm_transform(model: nn.Module, use_test_size: bool = False):
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model, use_test_size=use_test_size))


@pytest.mark.parametrize("name", [*NVIDIA, *TIMM_FAMILY])
def test_timms_transform_is_the_models_preprocessing(described, name):
    """The model page's snippet, create_transform(**resolve_data_config({}, model=model)), on every model."""
    model = described[name]
    timm_transform = _timm_transform(model)
    record = get_weights(name)
    for path in RGB_PHOTOS:
        with Image.open(path) as image:
            image = image.convert("RGB")
            assert torch.equal(timm_transform(image), model.preprocessing(image)), path.name
            if record.test_preprocessing is not None:
                assert torch.equal(_timm_transform(model, use_test_size=True)(image), record.test_preprocessing(image))


def test_timms_transform_for_a_fine_tuned_preset():
    """A model's own preset (a fine-tuned checkpoint's) with odd sizes, interpolation and statistics."""
    preset = ImageClassification(117, 100, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    model = ResNet(get_config(SMALL), 3, meta=ModelMeta(SMALL, preset, ClassList.of("abc")))
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 3 and cfg["input_size"] == (3, 100, 100) and cfg["pool_size"] == (4, 4)
    assert "tag" not in cfg and "url" not in cfg
    with Image.open(RGB_PHOTOS[0]) as image:
        image = image.convert("RGB")
        assert torch.equal(_timm_transform(model)(image), preset(image))


def test_crop_pct_gives_back_every_resize():
    """timm resizes to floor(size / crop_pct): each preset's crop_pct must give its own resize exactly."""
    for crop in range(16, 640, 3):
        for resize in range(crop - crop // 8, 2 * crop, 5):
            preset = ImageClassification(resize, crop, "bilinear", (0.5,) * 3, (0.5,) * 3)
            assert math.floor(crop / crop_pct(preset)) == resize, (resize, crop)
    assert crop_pct(ImageClassification(303, 288, "bicubic", (0.5,) * 3, (0.5,) * 3)) == 0.95


def test_the_timm_model_page_snippets_work(weights):
    """timm's model page: classification, and image embeddings (num_classes=0, forward_features/forward_head)."""
    model = hubconf.seresnext26d_32x4d(pretrained_from_file=weights).eval()
    reference = timm_twin(weights)
    with Image.open(RGB_PHOTOS[0]) as image:
        img = image.convert("RGB")
    data_config = timm.data.resolve_model_data_config(model)
    transforms = timm.data.create_transform(**data_config, is_training=False)
    with torch.no_grad():
        output = model(transforms(img).unsqueeze(0))
        top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
        want = reference(transforms(img).unsqueeze(0))
        close(output, want)
        assert top5_class_indices.tolist() == torch.topk(want, k=5).indices.tolist()

        embedder = hubconf.seresnext26d_32x4d(pretrained_from_file=weights, num_classes=0).eval()
        assert embedder(transforms(img).unsqueeze(0)).shape == (1, 2048)
        unpooled = model.forward_features(transforms(img).unsqueeze(0))
        assert unpooled.shape == (1, 2048, 7, 7)
        assert model.forward_head(unpooled, pre_logits=True).shape == (1, 2048)


# -- the optimized copy -----------------------------------------------------------------------------------


def test_optimized_copy_has_timms_inference_api(weights):
    model = build_model(SMALL, pretrained_from_file=weights, global_pool="max")
    fast = model.optimize_for_inference("fp32", reuse_memory=False)
    x = inputs()
    with torch.no_grad():
        close(fast(x), model(x))  # pooled by max, as the model
        features = fast.forward_features(x)
        close(features.float(), model.forward_features(x))
        close(fast.forward_head(features, pre_logits=True), model.forward_head(model.forward_features(x), True))
    assert fast.get_classifier() is fast.fc
    assert fast.pretrained_cfg == model.pretrained_cfg and fast.pretrained_cfg["first_conv"] == "conv1.0"


def test_auto_checks_a_copy_of_an_in_chans_model_on_its_channels(weights, monkeypatch):
    """``"auto"`` checks bf16 against fp32 on a random batch with the model's own channel count (bf16 tried
    as on a CPU with native bf16: here emulated, slower, the same numbers)."""
    monkeypatch.setattr("resnext_hub.models.optimize.cpu_has_native_bf16", lambda: True)
    model = build_model(SMALL, pretrained_from_file=weights, in_chans=1)
    fast = model.optimize_for_inference("auto", reuse_memory=False)
    assert fast.precision in ("bf16", "fp32")
    with torch.no_grad():
        assert fast(inputs(1)).shape == (2, 1000)


# -- the options are checked -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": -1}, "num_classes must be an int >= 0"),
        ({"in_chans": 0}, "in_chans must be a positive int"),
        ({"in_chans": 1.5}, "in_chans must be a positive int"),
        ({"drop_rate": 1.0}, r"drop_rate must be a probability in \[0, 1\)"),
        ({"drop_path_rate": -0.1}, r"drop_path_rate must be a probability in \[0, 1\)"),
        ({"global_pool": "sum"}, r"global_pool must be one of \('avg', 'max', 'avgmax', 'catavgmax', ''\)"),
        ({"global_pool": None}, "global_pool must be one of"),
    ],
)
def test_bad_options_fail_before_any_download(options, message, torch_home):
    with pytest.raises(ValueError, match=message):
        hubconf.seresnext26d_32x4d(**options)  # pretrained=True: would download
    assert not (torch_home / "hub").exists()


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="drop_path"):
        hubconf.seresnext26d_32x4d(pretrained=False, drop_path=0.1)


def test_nvidias_entry_points_keep_their_defaults():
    with torch.device("meta"):
        model = hubconf.nvidia_resneXt(pretrained=False)
    assert model.global_pool.pool_type == "avg" and model.drop_rate == 0.0 and model.conv1.in_channels == 3
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 1000
    assert all(block.drop_path is None for stage in (model.layer1, model.layer4) for block in stage)
