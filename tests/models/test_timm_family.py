"""timm's SE-ResNeXt family: our entry points compute timm's function from timm-layout files.

Each timm model is built by timm itself (``pretrained=False``) and given random BatchNorm
statistics and affine terms (timm initialises the last BN of each block to zero, which would
hide every residual branch), then saved as ``.pth`` and ``.safetensors``. Our entry points load
those files directly, from a mirror folder, and from an HTTP server on 127.0.0.1, and must give
timm's logits. The input is 72x88 so that the avg-pool shortcuts see odd sizes (ceil_mode).

Manifest records come from ``resnext_hub.models``, the namespace ``hubconf`` imports (top-level
``models`` is a second copy whose ``Weights`` class the entry points would not recognise).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from servers import FileServer
from torch.utils.flop_counter import FlopCounterMode

import hubconf
from resnext_hub.models import MIRROR_ENV, get_weights
from tools import model_table

pytestmark = pytest.mark.slow  # timm and our models side by side, seconds per case

TOLERANCE = 1e-4
# timm's parameter counts (``timm.create_model(name).parameters()``, timm/models/resnet.py; its results table,
# results/results-imagenet.csv, and timm's model cards on the Hugging Face Hub list them rounded to 16.81 / 16.81 /
# 27.56 M), written out here independently of both implementations.
TIMM_PARAMS = {"seresnext26d_32x4d": 16_809_512, "seresnext26t_32x4d": 16_806_976, "seresnext50_32x4d": 27_559_896}
NAMES = sorted(TIMM_PARAMS)
FORMATS = ("torch", "safetensors")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                # Small gains on the block's last BN keep activations bounded through the residual sum.
                uniform(module.weight, 0.0, 0.3) if name.endswith("bn3") else uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.1, 0.1)
                uniform(module.running_mean, -0.1, 0.1)
                uniform(module.running_var, 0.5, 1.5)
                module.num_batches_tracked.fill_(1000)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                uniform(module.bias, -0.2, 0.2)
        # A wide head spreads the logits, so that they depend visibly on the input.
        uniform(model.fc.weight, -1.0, 1.0)


@dataclasses.dataclass
class TimmCase:
    name: str
    timm_model: torch.nn.Module
    pth: Path
    safetensors: Path
    inputs: torch.Tensor
    logits: torch.Tensor

    def file(self, file_format: str) -> Path:
        return self.pth if file_format == "torch" else self.safetensors


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, TimmCase]:
    """Per model: timm's model, its state dict saved under the manifest's file names, reference logits."""
    found = {}
    for seed, name in enumerate(NAMES):
        model = timm.create_model(name, pretrained=False).eval()
        _randomize(model, seed)
        record = get_weights(name)
        folder = tmp_path_factory.mktemp(name)
        pth, st = folder / record.file_name, folder / record.alternatives[0].file_name
        assert record.alternatives[0].file_format == "safetensors"
        state = model.state_dict()
        torch.save(state, pth)
        save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        inputs = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            logits = model(inputs)
        found[name] = TimmCase(name, model, pth, st, inputs, logits)
    return found


def _check(model: torch.nn.Module, case: TimmCase) -> float:
    with torch.no_grad():
        diff = (model(case.inputs) - case.logits).abs().max().item()
    assert diff <= TOLERANCE, f"{case.name}: max |logit diff| {diff:.3g} > {TOLERANCE}"
    return diff


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    timm_count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    ours = getattr(hubconf, name)(pretrained=False)
    assert timm_count == TIMM_PARAMS[name]
    assert sum(p.numel() for p in ours.parameters()) == TIMM_PARAMS[name]
    assert get_weights(name).num_params == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_discriminating(cases, name):
    """The comparison can fail: timm's logits are spread out, and other weights give other logits."""
    case = cases[name]
    assert case.logits.std().item() > 0.05
    assert (case.logits[0] - case.logits[1]).abs().max().item() > 0.05
    with torch.no_grad():
        other = getattr(hubconf, name)(pretrained=False)(case.inputs)
    assert (other - case.logits).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_from_file_matches_timm(cases, name, file_format, torch_home):
    case = cases[name]
    model = getattr(hubconf, name)(pretrained_from_file=case.file(file_format))  # no pretrained=False needed
    assert not model.training
    assert model.architecture == name
    _check(model, case)
    # The channels-last model computes the same function.
    model = getattr(hubconf, name)(pretrained_from_file=case.file(file_format), channels_last=True)
    _check(model, case)
    assert not (torch_home / "hub").exists(), "loading a local file must not touch the cache"


def _true_prefix_record(case: TimmCase):
    """The manifest record with its torch file renamed to carry the file's real SHA-256 prefix,
    as timm's release names do (ours hold random weights, so the published names' prefixes fail)."""
    record = get_weights(case.name)
    digest = hashlib.sha256(case.pth.read_bytes()).hexdigest()
    file_name = f"{case.name}-{digest[:8]}.pth"
    return dataclasses.replace(record, source=dataclasses.replace(record.source, file_name=file_name), alternatives=())


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_mirror_folder_matches_timm(cases, name, file_format, torch_home, tmp_path, monkeypatch):
    """A mirror folder serves the torch file (name with its hash prefix) or, alone, the safetensors alternative."""
    case = cases[name]
    record = _true_prefix_record(case) if file_format == "torch" else get_weights(name)
    file_name = record.file_name if file_format == "torch" else record.alternatives[0].file_name
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / file_name).symlink_to(case.file(file_format))
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    model = getattr(hubconf, name)(weights=record)
    assert model.weights_record.name == record.name
    assert model.preprocessing.as_dict() == record.preprocessing.as_dict()
    _check(model, case)


@pytest.mark.parametrize("name", NAMES)
def test_http_mirror_checks_hash_and_falls_back_to_safetensors(cases, name, torch_home, tmp_path, monkeypatch):
    """Over HTTP the torch file's name carries a SHA-256 prefix: our random file fails it, is not
    cached, and the Hugging Face safetensors alternative is used; a second load needs no request."""
    case = cases[name]
    assert get_weights(name).file_name == case.pth.name
    served = tmp_path / "served"
    served.mkdir()
    for path in (case.pth, case.safetensors):
        (served / path.name).symlink_to(path)
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url + "/")
        model = getattr(hubconf, name)(progress=False)
        _check(model, case)
        cached = sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir() if not p.name.endswith(".json"))
        assert cached == [case.safetensors.name], "the file failing its name's hash prefix must not be cached"
        assert server.requests == {f"/{case.pth.name}": 1, f"/{case.safetensors.name}": 1}
        _check(getattr(hubconf, name)(progress=False), case)
        assert sum(server.requests.values()) == 2, f"the cached file must load without a request: {server.requests}"


@pytest.mark.parametrize("name", NAMES)
def test_http_mirror_torch_file_with_matching_hash_prefix(cases, name, torch_home, tmp_path, monkeypatch):
    """A torch file whose name carries its true SHA-256 prefix (as timm's releases do) downloads and loads."""
    case = cases[name]
    record = _true_prefix_record(case)
    served = tmp_path / "served"
    served.mkdir()
    (served / record.file_name).symlink_to(case.pth)
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        model = getattr(hubconf, name)(weights=record, progress=False)
        _check(model, case)
        assert server.requests == {f"/{record.file_name}": 1}
    assert (torch_home / "hub" / "checkpoints" / record.file_name).read_bytes() == case.pth.read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_table_flops_equal_timm_models(name):
    """The README's parameters and GFLOPs (counted on our entry point's model) equal timm's model's."""
    with torch.device("meta"):  # shapes only: FlopCounterMode needs no real compute
        timm_model = timm.create_model(name, pretrained=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        timm_model(torch.empty(1, 3, model_table.FLOPS_SIZE, model_table.FLOPS_SIZE, device="meta"))
    num_params, gflops = model_table.measure(name)
    assert gflops == counter.get_total_flops() / 1e9
    assert num_params == TIMM_PARAMS[name]
