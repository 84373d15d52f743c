"""Download, cache and mirror, against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, WeightsUnavailableError, build_model
from resnext_hub.models.download import cache_dir, fetch_checkpoint
from resnext_hub.models.integrity import sha256_of
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import NGC_FILES

ARCH = "resnext101_32x4d"
FILE = NGC_FILES[ARCH]


@pytest.mark.slow
def test_download_into_torch_hub_cache_then_no_request(ngc_dir, torch_home, monkeypatch, capfd):
    with FileServer(ngc_dir) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        first = build_model(ARCH)
        assert server.requests[f"/{FILE}"] == 1
        cached = torch_home / "hub" / "checkpoints" / FILE
        assert cache_dir() == cached.parent and cached.is_file()
        assert "%" in capfd.readouterr().err  # torch.hub's progress bar
        stamp = json.loads(cached.with_name(FILE + ".sha256.json").read_text())
        assert stamp["sha256"] == sha256_of(ngc_dir / FILE) and stamp["size"] == cached.stat().st_size
        second = build_model(ARCH, progress=False)
        assert server.requests[f"/{FILE}"] == 1  # served from the cache
    assert first.weights_record.name == "resnext101_32x4d.ngc_20.06"
    assert torch.equal(first.layer3[5].conv2.weight, second.layer3[5].conv2.weight)
    assert not list(cached.parent.glob("*.partial"))


@pytest.mark.slow
def test_mirror_folder_is_used_in_place(ngc_dir, torch_home, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(ngc_dir))
    model = build_model(ARCH)
    reference = torch.load(ngc_dir / FILE, weights_only=True)
    assert torch.equal(model.fc.weight, reference["fc.weight"])
    assert not (torch_home / "hub" / "checkpoints" / FILE).exists()


def test_mirror_folder_without_the_file(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=f"has no file '{FILE}'"):
        build_model(ARCH)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_error_names_url_cache_and_variable(torch_home):
    url = f"http://127.0.0.1:{_closed_port()}/weights/{FILE}"
    with pytest.raises(WeightsUnavailableError) as error:
        fetch_checkpoint((Source(url=url, file_name=FILE),), progress=False)
    message = str(error.value)
    assert url in message and str(torch_home / "hub" / "checkpoints") in message and MIRROR_ENV in message
    assert not (torch_home / "hub" / "checkpoints" / FILE).exists()


def test_http_404_from_mirror(tmp_path, torch_home, monkeypatch):
    with FileServer(tmp_path) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url + "/")
        with pytest.raises(WeightsUnavailableError, match="404"):
            build_model(ARCH)


@pytest.mark.slow
def test_hash_prefix_in_file_name_is_checked(ngc_dir, tmp_path, torch_home, monkeypatch):
    digest = sha256_of(ngc_dir / FILE)
    good, bad = f"weights-{digest[:8]}.pth", "weights-00000000.pth"
    for name in (good, bad):
        shutil.copy(ngc_dir / FILE, tmp_path / name)
    with FileServer(tmp_path) as server:
        path, _ = fetch_checkpoint((Source(url=f"{server.url}/{good}", file_name=good),), progress=False)
        assert path.read_bytes() == (ngc_dir / FILE).read_bytes()
        with pytest.raises(WeightsUnavailableError, match="expected the prefix 00000000"):
            fetch_checkpoint((Source(url=f"{server.url}/{bad}", file_name=bad),), progress=False)
    assert not (cache_dir() / bad).exists()


@pytest.mark.slow
def test_manifest_sha256_and_size_are_checked(ngc_dir, torch_home):
    real = sha256_of(ngc_dir / FILE)
    with FileServer(ngc_dir) as server:
        url = f"{server.url}/{FILE}"
        with pytest.raises(WeightsUnavailableError, match="expected " + "f" * 64):
            fetch_checkpoint((Source(url=url, file_name=FILE, sha256="f" * 64),), progress=False)
        with pytest.raises(WeightsUnavailableError, match="expected 123"):
            fetch_checkpoint((Source(url=url, file_name=FILE, size_bytes=123),), progress=False)
        path, _ = fetch_checkpoint((Source(url=url, file_name=FILE, sha256=real),), progress=False)
    assert sha256_of(path) == real


def test_pretrained_false_makes_no_request(torch_home, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    model = build_model(ARCH, pretrained=False)
    assert model.weights_record is None and isinstance(model, torch.nn.Module)
