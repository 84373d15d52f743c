"""A fetched file that does not load into the model it was fetched for is not trusted again.

Where the publisher gives no hash (trust on first use), a mirror or server that serves the wrong
file (another model's, or no checkpoint at all) must not pin it in the cache: the builder deletes
the cached copy and its stamp, says so, and the next load after the source is fixed fetches and
loads the right file. A mirror folder's file is used in place: it is named, never deleted.
Servers are real sockets on 127.0.0.1; files are real files.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, CheckpointError, build_model, get_weights
from resnext_hub.models.download import cache_dir
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import random_state_dict

pytestmark = pytest.mark.slow  # downloads and loads of real-size checkpoints

ARCH = "seresnext26d_32x4d"
SAFETENSORS = "seresnext26d_32x4d.bt_in1k.safetensors"  # the manifest's alternative source: no published hash
STAMP = SAFETENSORS + ".sha256.json"


@pytest.fixture(scope="module")
def right(tmp_path_factory):
    """(path, state) of a seresnext26d_32x4d checkpoint in safetensors (random weights, timm's names)."""
    state = random_state_dict(ARCH, seed=11)
    path = tmp_path_factory.mktemp("right") / SAFETENSORS
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, state


def _wrong_safetensors(path) -> None:
    """Another model's weights (a tiny made-up state dict): a valid file that fits nothing here."""
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)


def _same_weights(model, state) -> None:
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def _cache_listing() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_wrong_file_from_a_mirror_url_is_forgotten_then_the_right_one_loads(right, tmp_path, torch_home, monkeypatch):
    served = tmp_path / "mirror"
    served.mkdir()
    _wrong_safetensors(served / SAFETENSORS)
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises(CheckpointError) as caught:
            build_model(ARCH, progress=False)
        message = str(caught.value)
        assert "does not fit" in message and str(cache_dir() / SAFETENSORS) in message
        assert "deleted" in message and server.url in message
        assert _cache_listing() == []  # neither the file nor its stamp: no longer trusted
        shutil.copy(right[0], served / SAFETENSORS)  # the mirror is fixed
        model = build_model(ARCH, progress=False)
        assert server.requests[f"/{SAFETENSORS}"] == 2
        build_model(ARCH, progress=False)  # and trusted from now on
        assert server.requests[f"/{SAFETENSORS}"] == 2
    _same_weights(model, right[1])
    assert _cache_listing() == [SAFETENSORS, STAMP]


def test_a_wrong_file_in_a_mirror_folder_is_named_and_never_deleted(right, tmp_path, torch_home, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    _wrong_safetensors(folder / SAFETENSORS)
    wrong = (folder / SAFETENSORS).read_bytes()
    monkeypatch.setenv(MIRROR_ENV, str(folder))
    with pytest.raises(CheckpointError) as caught:
        build_model(ARCH, progress=False)
    message = str(caught.value)
    assert str(folder / SAFETENSORS) in message and MIRROR_ENV in message and "replace" in message
    assert "deleted" not in message
    assert (folder / SAFETENSORS).read_bytes() == wrong  # used in place: never deleted
    assert _cache_listing() == []  # and never copied
    shutil.copy(right[0], folder / SAFETENSORS)
    _same_weights(build_model(ARCH, progress=False), right[1])
    assert _cache_listing() == []


def test_a_wrong_file_from_the_direct_url_is_forgotten_then_the_right_one_loads(small_checkpoint, tmp_path, torch_home):
    """No mirror: the record's own URL served a torch file that is not a checkpoint of this model."""
    name = "seresnext26d_32x4d.direct.pth"
    served = tmp_path / "publisher"
    served.mkdir()
    torch.save({"state_dict": {"layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}, "epoch": 3}, served / name)
    with FileServer(served) as server:
        record = replace(get_weights(ARCH), source=Source(url=f"{server.url}/{name}", file_name=name), alternatives=())
        with pytest.raises(CheckpointError) as caught:
            build_model(ARCH, weights=record, progress=False)
        assert "does not fit" in str(caught.value) and "deleted" in str(caught.value)
        assert _cache_listing() == []
        shutil.copy(small_checkpoint, served / name)  # the publisher fixed the file
        model = build_model(ARCH, weights=record, progress=False)
        assert server.requests[f"/{name}"] == 2
    _same_weights(model, torch.load(small_checkpoint, weights_only=True))
    assert _cache_listing() == [name, name + ".sha256.json"]
