"""Head surgery (issue 19): a model whose ``fc`` was replaced by hand keeps true ``classes``/``num_classes``,
its fast copies keep the head and the eager outputs, and a head without classes is a clear error naming ``fc``.

The replacements are the ones public code does with NVIDIA's hub entries: ``nn.Identity()`` (a backbone),
``nn.Linear(2048, n)``, ``nn.Sequential(nn.Linear(2048, n), nn.Sigmoid())``. The small model with random
weights and trained-like BatchNorm statistics (tools/fake_checkpoints.py), at 64-96 px.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn

from resnext_hub.engine import Engine
from resnext_hub.models import HeadError, ResNet, build_model, cpu
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import ClassList
from tools.fake_checkpoints import random_state_dict

SMALL = "seresnext26d_32x4d"
WIDTH = 2048  # the pooled features of every variant here


class TwoHeads(nn.Module):
    """A custom head whose class count cannot be read from its modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(WIDTH, 3)
        self.b = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DeclaredHead(TwoHeads):
    """The same head, saying its class count as ``out_features``."""

    out_features = 7


@functools.cache
def _base() -> ResNet:
    model = build_model(SMALL, pretrained=False)
    model.load_state_dict(random_state_dict(SMALL, seed=5))
    return model.eval()


def small_model(head: nn.Module | None = None) -> ResNet:
    """A fresh copy of the small model in eval mode, its ``fc`` replaced by ``head`` (seeded) when given."""
    model = copy.deepcopy(_base())
    if head is not None:
        torch.manual_seed(1)
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        model.fc = head
    return model.eval()  # a new head comes in training mode (its dropout active), as after any surgery


def images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(4))


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: equal up to rounding, 1e-5 of the largest output's magnitude."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


# -- classes and num_classes follow the head --------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "count"),
    [
        (nn.Linear(WIDTH, 10), 10),
        (nn.Sequential(nn.Linear(WIDTH, 5), nn.Sigmoid()), 5),
        (nn.Sequential(nn.Dropout(0.2), nn.Linear(WIDTH, 7)), 7),
        (nn.Sequential(nn.Linear(WIDTH, 512), nn.ReLU(), nn.Dropout(), nn.Linear(512, 4), nn.Softmax(dim=1)), 4),
        (nn.Linear(WIDTH, 1), 1),
        (DeclaredHead(), 7),
    ],
)
def test_a_replaced_head_gives_its_class_count_and_index_names(head, count):
    model = small_model(head)
    assert model.num_classes == count
    assert model.classes.names == tuple(str(i) for i in range(count))
    with torch.inference_mode():
        assert model(images(2)).shape[1] == (7 if isinstance(head, DeclaredHead) else count)


def test_the_models_own_names_stay_when_the_count_matches():
    model = small_model()
    assert model.num_classes == 1000 and model.classes == model.meta.classes
    model.reset_classifier(3, classes=ClassList.of(["cat", "dog", "fox"]))
    model.fc = nn.Sequential(nn.Linear(WIDTH, 3), nn.Softmax(dim=1))
    assert model.classes.names == ("cat", "dog", "fox")
    model.fc = nn.Linear(WIDTH, 4)  # another count: the names no longer fit it
    assert model.classes.names == ("0", "1", "2", "3")


@pytest.mark.parametrize("head", [nn.Identity(), nn.Sequential(nn.Dropout(0.1), nn.Identity())])
def test_an_identity_head_gives_pooled_features_and_no_classes(head):
    model = small_model(head)
    assert model.num_classes == 0  # timm's meaning: no classifier
    with pytest.raises(HeadError) as raised:
        model.classes  # noqa: B018
    message = str(raised.value)
    assert not isinstance(raised.value, AttributeError)
    assert message.startswith(f"model.fc is {type(head).__name__}: the model outputs pooled features (2048 values)")
    assert "nn.Linear(2048, n)" in message and "reset_classifier" in message
    with torch.inference_mode():
        x = images(2)
        final, _ = model.forward_intermediates(x, indices=[4])
        assert torch.equal(model(x), final.mean((2, 3)))  # the pooled features of the last stage


@pytest.mark.parametrize("head", [TwoHeads(), nn.Sequential(nn.Linear(WIDTH, 5), nn.BatchNorm1d(5))])
def test_a_head_whose_count_cannot_be_read_is_a_clear_error_naming_fc(head):
    model = small_model(head)
    for read in ("num_classes", "classes"):
        with pytest.raises(HeadError, match=rf"^model\.fc is {type(head).__name__}: its class count cannot be read"):
            getattr(model, read)
    with pytest.raises(HeadError, match="integer attribute out_features"):
        model.num_classes  # noqa: B018


def test_reset_classifier_replaces_an_identity_head():
    model = small_model(nn.Identity())
    model.reset_classifier(4)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == WIDTH and model.num_classes == 4
    assert model.classes.names == ("0", "1", "2", "3")


# -- optimize_for_inference keeps the head ------------------------------------------------------------


HEADS = {
    "linear": lambda: nn.Linear(WIDTH, 10),
    "sigmoid": lambda: nn.Sequential(nn.Linear(WIDTH, 5), nn.Sigmoid()),
    "identity": nn.Identity,
    "custom": TwoHeads,
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fp32_copy_keeps_the_users_head_and_the_eager_output(name):
    model = small_model(HEADS[name]())
    fast = model.optimize_for_inference("fp32", compile=False)
    assert fast.precision == "fp32"
    # The user's head module as it is: a deep copy of the same type and structure, not a rebuilt Linear.
    assert type(fast.fc) is type(model.fc) and repr(fast.fc) == repr(model.fc) and fast.fc is not model.fc
    assert not {p.data_ptr() for p in fast.fc.parameters()} & {p.data_ptr() for p in model.fc.parameters()}
    x = images(3, size=96)
    with torch.inference_mode():
        want = model(x)
        assert_same(fast(x), want)
        assert_same(fast(x.contiguous(memory_format=torch.channels_last)), want)
    assert (want[0] - want[1]).abs().max().item() > 1e-4  # the outputs differ by input: not a trivial pass
    assert fast.architecture == model.architecture and fast.preprocessing == model.preprocessing
    if name == "identity":
        assert fast.num_classes == 0 and want.shape == (3, WIDTH)
        with pytest.raises(HeadError, match=r"model\.fc is Identity: the model outputs pooled features"):
            fast.classes  # noqa: B018
    elif name == "custom":
        with pytest.raises(HeadError, match="cannot be read"):
            fast.classes  # noqa: B018
    else:
        assert fast.classes == model.classes and fast.num_classes == model.num_classes == want.shape[1]


def test_the_compiled_copy_describes_its_head():
    """Read without calling it (compiling happens on the first call): classes follow the compiled copy's head."""
    fast = small_model(nn.Sequential(nn.Linear(WIDTH, 5), nn.Sigmoid())).optimize_for_inference("fp32", compile=True)
    assert type(fast).__name__ == "CompiledResNet" and isinstance(fast.fc, nn.Sequential)
    assert fast.num_classes == 5 and fast.classes.names == ("0", "1", "2", "3", "4")
    features = small_model(nn.Identity()).optimize_for_inference("fp32", compile=True)
    assert features.num_classes == 0
    with pytest.raises(HeadError, match=r"model\.fc is Identity"):
        features.classes  # noqa: B018


def test_the_copy_does_not_follow_later_surgery_on_the_model():
    model = small_model(nn.Sequential(nn.Linear(WIDTH, 5), nn.Sigmoid()))
    fast = model.optimize_for_inference("fp32")
    model.fc = nn.Identity()
    assert fast.num_classes == 5 and model.num_classes == 0


@pytest.mark.parametrize("name", ["linear", "sigmoid", "identity"])
def test_bf16_copy_keeps_the_head_faithfully(name, caplog):
    """bf16 everywhere (emulated, with a warning, on CPUs without native bf16): the head is cast with the rest."""
    model = small_model(HEADS[name]())
    with caplog.at_level(logging.WARNING):
        fast = model.optimize_for_inference("bf16", compile=False)
    assert fast.precision == "bf16" and type(fast.fc) is type(model.fc)
    assert all(p.dtype == torch.bfloat16 for p in fast.fc.parameters())
    x = images(4)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=1).min().item() >= 0.999


def test_auto_checks_a_one_output_head_without_a_top1(monkeypatch):
    """auto's faithfulness check on a head with one output (no second logit to rank against)."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # auto then tries bf16
    model = small_model(nn.Linear(WIDTH, 1))
    fast = model.optimize_for_inference("auto")
    assert fast.precision in ("bf16", "fp32") and fast.num_classes == 1
    with torch.inference_mode():
        x = images(2)
        assert torch.allclose(fast(x), model(x), rtol=0.02, atol=0.02 * model(x).abs().max().item())


# -- the Engine --------------------------------------------------------------------------------------


def test_engine_refuses_a_head_without_classes_when_built():
    with pytest.raises(HeadError, match=r"model\.fc is Identity: the model outputs pooled features"):
        Engine(small_model(nn.Identity()), InferenceOptions(device="cpu", precision="fp32"))


def test_engine_ranks_a_replaced_head_with_its_classes():
    model = small_model(nn.Sequential(nn.Linear(WIDTH, 3), nn.Sigmoid()))
    engine = Engine(model, InferenceOptions(device="cpu", precision="fp32"))
    assert engine.num_classes == 3 and engine.classes.names == ("0", "1", "2")
    x = images(2)
    with torch.inference_mode():
        want = model(x)
    ranked = engine.top_k(x, k=3)
    assert [[p.index for p in row] for row in ranked] == want.argsort(dim=1, descending=True).tolist()
