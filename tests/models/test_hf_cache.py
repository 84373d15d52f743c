"""Weights from an existing Hugging Face cache, offline first: a fake cache in the real layout under tmp.

The layout is checked against huggingface_hub's own reader (``try_to_load_from_cache``), and a weights mirror
on a loopback HTTP server records every request: a file found in the cache must cost none, and with
``HF_HUB_OFFLINE=1`` nothing is requested at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file
from servers import FileServer

from resnext_hub import cli
from resnext_hub.models import MIRROR_ENV, WeightsUnavailableError, build_model, get_weights
from resnext_hub.models.download import fetch_checkpoint
from resnext_hub.models.hf_cache import hub_cache_dir, hub_offline
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import random_state_dict

ARCH = "seresnext26d_32x4d"
REPO = "timm/seresnext26d_32x4d.bt_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_URL = get_weights(ARCH).alternatives[0].url  # the manifest's source on the Hub (revision main)


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(dict(random_state_dict(ARCH, seed=3)), str(path))
    return path.read_bytes()


def write_hf_cache(cache: Path, repo: str, content: bytes, *, file_name: str = "model.safetensors") -> Path:
    """``content`` as huggingface_hub stores a downloaded LFS file: a blob named by its SHA-256, a snapshot link
    to it, and ``refs/main`` naming the snapshot's commit. Returns the snapshot path."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT / file_name
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot


@pytest.fixture
def hf_home(tmp_path, torch_home, monkeypatch) -> Path:
    """An empty HF_HOME (its cache is HF_HOME/hub), online, beside an empty torch.hub cache."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


@pytest.fixture
def recording_mirror(tmp_path, monkeypatch):
    """A weights mirror on 127.0.0.1 (serving nothing) that records any request."""
    with FileServer(tmp_path / "nothing") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        yield server


def test_cache_folder_and_offline_switch_follow_huggingface_hub(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
    assert not hub_offline()
    for value, offline in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline, value


def test_file_in_hf_cache_is_used_without_any_request(hf_home, recording_mirror, safetensors_bytes):
    snapshot = write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)
    # huggingface_hub's own reader finds the same file: the fake cache has the real layout.
    assert try_to_load_from_cache(REPO, "model.safetensors", cache_dir=hf_home / "hub") == str(snapshot)
    model = build_model(ARCH, progress=False)
    assert not recording_mirror.requests
    assert model.weights_record.name == "seresnext26d_32x4d.bt_in1k"
    expected = random_state_dict(ARCH, seed=3)
    assert torch.equal(model.layer2[1].se.fc1.weight, expected["layer2.1.se.fc1.weight"])


def test_hf_hub_offline_uses_the_cache_and_names_where_it_looked(
    hf_home, recording_mirror, safetensors_bytes, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as error:
        build_model(ARCH, progress=False)
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert str(hf_home / "hub" / "models--timm--seresnext26d_32x4d.bt_in1k" / "refs" / "main") in message
    assert "seresnext26d_32x4d-80fa48a3.pth" in message  # the torch.hub cache entry looked for
    assert not recording_mirror.requests  # no network at all, not even the mirror URL
    write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)
    model = build_model(ARCH, weights="hf-hub:" + REPO, progress=False)  # the hub spelling of timm's id
    assert model.weights_record.hf_hub_id == REPO and not recording_mirror.requests


def test_hf_hub_cache_variable_wins_over_hf_home(hf_home, tmp_path, safetensors_bytes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)  # not where HF_HUB_CACHE points
    with pytest.raises(WeightsUnavailableError, match="elsewhere"):
        build_model(ARCH, progress=False)
    write_hf_cache(tmp_path / "elsewhere", REPO, safetensors_bytes)
    assert build_model(ARCH, progress=False).weights_record.name == "seresnext26d_32x4d.bt_in1k"


def test_changed_file_in_hf_cache_is_refused_and_left_alone(hf_home, safetensors_bytes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)
    other = write_hf_cache(hf_home / "other", REPO, safetensors_bytes[:-4] + b"\0\0\0\0")  # same size, other bytes
    blob = snapshot.resolve()
    blob.write_bytes(other.resolve().read_bytes())  # replaced in place: no longer the blob its name says
    with pytest.raises(WeightsUnavailableError) as error:
        build_model(ARCH, progress=False)
    assert "(Hugging Face cache) is not seresnext26d_32x4d.bt_in1k.safetensors" in str(error.value)
    assert f"the cache stores it as blob {blob.name}" in str(error.value)
    assert blob.read_bytes() == other.resolve().read_bytes()  # not ours to delete


def test_manifest_hash_and_timm_hash_in_name_are_checked_in_hf_cache(hf_home, safetensors_bytes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)
    digest = hashlib.sha256(safetensors_bytes).hexdigest()
    good = Source(url=HF_URL, file_name=f"seresnext26d-{digest[:8]}.safetensors", file_format="safetensors")
    assert fetch_checkpoint((good,), progress=False)[0].resolve().name == digest
    wrong_prefix = Source(url=HF_URL, file_name="seresnext26d-00000000.safetensors", file_format="safetensors")
    with pytest.raises(WeightsUnavailableError, match="expected the prefix 00000000 in its name"):
        fetch_checkpoint((wrong_prefix,), progress=False)
    wrong_sha = Source(url=HF_URL, file_name="x.safetensors", file_format="safetensors", sha256="0" * 64)
    with pytest.raises(WeightsUnavailableError, match=f"sha256 {digest}, expected 0000"):
        fetch_checkpoint((wrong_sha,), progress=False)


@pytest.mark.slow  # a forward pass through the command line
def test_hf_hub_id_through_the_command_line(hf_home, recording_mirror, safetensors_bytes, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_hf_cache(hf_home / "hub", REPO, safetensors_bytes)
    image = Path(__file__).resolve().parents[2] / "assets" / "images" / "coffee.jpg"
    argv = ["classify", str(image), "--model", "hf-hub:" + REPO, "--precision", "fp32", "--format", "json"]
    assert cli.main([*argv, "--device", "cpu", "--top-k", "1"]) == 0
    assert '"predictions"' in capsys.readouterr().out and not recording_mirror.requests
    assert cli.main([*argv, "--weights", "other_tag"]) == 2
    assert "contradicts it" in capsys.readouterr().err


def test_unknown_hf_hub_id_lists_the_ones_served(capsys):
    with pytest.raises(ValueError, match=r"Expected one of \['hf-hub:timm/seresnext26d_32x4d.bt_in1k'"):
        get_weights(ARCH, "hf-hub:timm/resnet50.a1_in1k")
    with pytest.raises(ValueError, match="are for 'seresnext50_32x4d', not 'seresnext26d_32x4d'"):
        get_weights(ARCH, "hf-hub:timm/seresnext50_32x4d.racm_in1k")
    with pytest.raises(SystemExit):
        cli.main(["classify", "x.jpg", "--model", "hf-hub:timm/resnet50.a1_in1k"])
    assert "hf-hub:timm/seresnext50_32x4d.racm_in1k" in capsys.readouterr().err
