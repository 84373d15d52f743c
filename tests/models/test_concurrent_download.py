"""Several processes loading the same model on a cold cache at once all succeed with identical
weights: each downloads to its own temporary file and the atomic rename lets one win."""

from __future__ import annotations

import hashlib
import multiprocessing
import time

import pytest
import torch
from rawserver import RawServer
from safetensors.torch import save_file

from resnext_hub.models import MIRROR_ENV, build_model
from resnext_hub.models.download import cache_dir
from resnext_hub.models.integrity import sha256_of
from tools.fake_checkpoints import random_state_dict

pytestmark = pytest.mark.slow  # processes racing for one download

ARCH = "seresnext26d_32x4d"
SAFETENSORS = "seresnext26d_32x4d.bt_in1k.safetensors"  # the manifest's alternative source
PROCESSES = 3


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_in_child(barrier, results) -> None:
    """Runs in a spawned process (TORCH_HOME and the mirror come from the parent's environment)."""
    barrier.wait(timeout=120)  # every process reaches the cold cache at the same moment
    try:
        model = build_model(ARCH, progress=False)
        results.put(_weights_digest(model.state_dict()))
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put(f"{type(error).__name__}: {error}")


def _slow(data: bytes, seconds: float = 1.0):
    """Serve ``data`` in 64 KB pieces over about ``seconds``, so the downloads overlap."""

    def behaviour(conn, stop) -> None:
        head = f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n"
        conn.sendall(head.encode())
        pieces = range(0, len(data), 1 << 16)
        for start in pieces:
            if stop.is_set():
                return
            conn.sendall(data[start : start + (1 << 16)])
            time.sleep(seconds / len(pieces))

    return behaviour


def test_cold_cache_concurrent_loads_agree(tmp_path, torch_home, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    state = random_state_dict(ARCH, seed=5)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / SAFETENSORS)
    expected = _weights_digest(state)
    # Only the safetensors alternative is on this mirror: the primary .pth gets a 404 first.
    with RawServer({f"/{SAFETENSORS}": _slow((folder / SAFETENSORS).read_bytes())}) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        children = [context.Process(target=_load_in_child, args=(barrier, results)) for _ in range(PROCESSES)]
        for child in children:
            child.start()
        digests = [results.get(timeout=240) for _ in children]
        for child in children:
            child.join(timeout=60)
        fetched = server.paths.count(f"/{SAFETENSORS}")
    assert digests == [expected] * PROCESSES
    assert [child.exitcode for child in children] == [0] * PROCESSES
    cached = cache_dir() / SAFETENSORS
    assert sha256_of(cached) == sha256_of(folder / SAFETENSORS)
    assert sorted(p.name for p in cache_dir().iterdir()) == [SAFETENSORS, f"{SAFETENSORS}.sha256.json"]
    assert fetched >= 2, f"only {fetched} download(s): the processes did not race on the cold cache"
