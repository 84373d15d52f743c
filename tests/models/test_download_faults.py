"""Bad servers and damaged caches: a bad download leaves nothing in the cache, a damaged
cached file is never loaded (it is deleted and fetched once more), and a re-fetch must give
the file recorded at first download. Servers are real sockets on 127.0.0.1.

The download timeouts are module settings; tests shorten them (configuration, not mocks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from rawserver import RawServer, drip, reply, stall
from safetensors.torch import save_file
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, WeightsUnavailableError, build_model, download
from resnext_hub.models.download import cache_dir, fetch_checkpoint
from resnext_hub.models.integrity import sha256_of
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import random_state_dict

SMALL = "small-weights.pth"
TIMEOUT_S = 0.5
DEADLINE_S = 1.0


@pytest.fixture
def fast_timeouts(monkeypatch):
    monkeypatch.setattr(download, "CONNECT_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(download, "READ_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(download, "DEADLINE_S", DEADLINE_S)


@pytest.fixture
def served(tmp_path) -> Path:
    """A folder with a 1 MB torch checkpoint (zip format, as torch.save writes it)."""
    folder = tmp_path / "served"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": {"w": torch.randn(512, 512)}, "epoch": 3}, folder / SMALL)
    return folder


def _source(base_url: str, name: str = SMALL, **kwargs) -> tuple[Source]:
    return (Source(url=f"{base_url}/{name}", file_name=name, **kwargs),)


def _cache_listing() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _corrupt_middle(path: Path, length: int = 4096) -> None:
    """Overwrite ``length`` bytes in the middle, keeping the size (the mtime changes)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(os.urandom(length))


# --- a bad download leaves nothing ------------------------------------------------------------


FAULTS = {
    "http-404": lambda good: reply(b"no", status="404 Not Found", content_type="text/plain"),
    "http-500": lambda good: reply(b"oops", status="500 Internal Server Error"),
    "short-body": lambda good: reply(good[: len(good) // 2], content_length=len(good)),
    "cut-no-length": lambda good: reply(good[: len(good) // 2], content_length=False),
    "captive-portal-html": lambda good: reply(b"<!DOCTYPE html><html>Sign in</html>", content_type="text/html"),
    "empty-body": lambda good: reply(b""),
    "never-answers": lambda good: stall(),
    "head-then-silence": lambda good: stall(send_head=True),
    "drips": lambda good: drip(interval_s=0.02, content_length=len(good)),
    "drips-headers": lambda good: drip(interval_s=0.02, in_head=True),
}
REASONS = {
    "http-404": "404",
    "http-500": "500",
    "short-body": "IncompleteRead",
    "cut-no-length": "cut-short",
    "captive-portal-html": "not a torch checkpoint",
    "empty-body": "not a torch checkpoint",
    "never-answers": "timed out",
    "head-then-silence": "timed out",
    "drips": "took over",
    "drips-headers": "took over",
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_failed_download_leaves_nothing_in_the_cache(name, served, torch_home, fast_timeouts, monkeypatch):
    behaviour = FAULTS[name]((served / SMALL).read_bytes())
    if name.startswith("drips"):
        # Only the overall deadline may end a drip: on a loaded machine a gap between two drops can outlast a
        # short read timeout, which would end it for another reason.
        monkeypatch.setattr(download, "READ_TIMEOUT_S", 2 * DEADLINE_S + 2 * TIMEOUT_S)
    with RawServer(behaviour) as server:
        started = time.monotonic()
        with pytest.raises(WeightsUnavailableError) as caught:
            fetch_checkpoint(_source(server.url), progress=False)
        elapsed = time.monotonic() - started
    assert REASONS[name] in str(caught.value)
    assert str(cache_dir()) in str(caught.value) and MIRROR_ENV in str(caught.value)
    assert elapsed < DEADLINE_S + 2 * TIMEOUT_S + 1.0, f"took {elapsed:.2f} s"
    assert _cache_listing() == []  # no file, no .partial, no stamp


def test_credentials_in_a_mirror_url_are_never_shown(torch_home, monkeypatch):
    with RawServer(reply(b"no", status="404 Not Found", content_type="text/plain")) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url.replace("http://", "http://alice:s3cret@"))
        with pytest.raises(WeightsUnavailableError, match="HTTP 404") as caught:
            fetch_checkpoint(_source("http://unused.invalid"), progress=False)
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)
    assert "http://***@127.0.0.1" in str(caught.value)


def test_the_raw_server_serves_good_files(served, torch_home):
    """Control for the faults above: the same server, honest, gives a verified cached file."""
    good = (served / SMALL).read_bytes()
    for content_length in (True, False):
        with RawServer(reply(good, content_length=content_length)) as server:
            path, _ = fetch_checkpoint(_source(server.url), progress=False)
        assert path.read_bytes() == good
        path.unlink()
    assert _cache_listing() == [f"{SMALL}.sha256.json"]


@pytest.mark.slow
def test_a_killed_download_leaves_a_partial_that_the_next_fetch_removes(served, torch_home):
    good = (served / SMALL).read_bytes()
    code = (
        "import sys; from resnext_hub.models.download import fetch_checkpoint; "
        "from resnext_hub.models.weights import Source; "
        "fetch_checkpoint((Source(url=sys.argv[1] + '/' + sys.argv[2], file_name=sys.argv[2]),), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with RawServer(drip(interval_s=0.01, content_length=len(good))) as server:
        child = subprocess.Popen([sys.executable, "-c", code, server.url, SMALL], env=env, cwd=served)
        try:
            deadline = time.monotonic() + 60
            while not any(name.endswith(".partial") for name in _cache_listing()):
                assert child.poll() is None and time.monotonic() < deadline, "the download never started"
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    assert [name for name in _cache_listing() if name.endswith(".partial")]
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
    assert path.read_bytes() == good
    assert _cache_listing() == [SMALL, f"{SMALL}.sha256.json"]


# --- a damaged cache is never loaded ----------------------------------------------------------


def test_corrupted_cached_file_is_deleted_and_fetched_once_more(served, torch_home, caplog):
    good = (served / SMALL).read_bytes()
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        assert fetch_checkpoint(_source(server.url), progress=False)[0] == path
        assert server.requests[f"/{SMALL}"] == 1  # intact: from the cache, by its stamp
        _corrupt_middle(path)
        assert path.stat().st_size == len(good) and path.read_bytes() != good
        with caplog.at_level(logging.WARNING, logger="models.download"):
            path, _ = fetch_checkpoint(_source(server.url), progress=False)
        assert server.requests[f"/{SMALL}"] == 2
    assert "is corrupt" in caplog.text and "recorded at download" in caplog.text
    assert path.read_bytes() == good
    assert _cache_listing() == [SMALL, f"{SMALL}.sha256.json"]


@pytest.mark.parametrize("damage", ["truncated", "emptied", "html-in-place"])
def test_truncated_or_replaced_cached_files_are_fetched_again(damage, served, torch_home):
    good = (served / SMALL).read_bytes()
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        content = {"truncated": good[: len(good) // 3], "emptied": b"", "html-in-place": b"<html></html>"}[damage]
        path.write_bytes(content)
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        assert server.requests[f"/{SMALL}"] == 2
    assert path.read_bytes() == good


def test_a_cut_short_file_without_a_stamp_is_not_trusted(served, torch_home):
    """No stamp and no published hash (a file dropped into the cache by hand): the zip structure
    still shows that it was cut short."""
    good = (served / SMALL).read_bytes()
    cache_dir().mkdir(parents=True)
    (cache_dir() / SMALL).write_bytes(good[:-1000])
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        assert server.requests[f"/{SMALL}"] == 1
    assert path.read_bytes() == good


def test_the_re_fetch_must_be_the_file_first_recorded(served, torch_home):
    """Trust on first use: after corruption the server sends a different file; it is refused."""
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        recorded = sha256_of(path)
        _corrupt_middle(path)
        torch.save({"state_dict": {"w": torch.zeros(4)}}, served / SMALL)  # the "publisher" changed it
        with pytest.raises(WeightsUnavailableError, match=f"{recorded} was recorded when it was first downloaded"):
            fetch_checkpoint(_source(server.url), progress=False)
    assert _cache_listing() == [f"{SMALL}.sha256.json"]  # the damaged file is gone, the record stays


def test_corrupted_cache_with_the_server_gone(served, torch_home, fast_timeouts):
    with FileServer(served) as server:
        path, _ = fetch_checkpoint(_source(server.url), progress=False)
        url = server.url
    _corrupt_middle(path)
    with pytest.raises(WeightsUnavailableError, match="could not download"):
        fetch_checkpoint(_source(url), progress=False)
    assert not path.exists()  # never left behind to be loaded later


def test_manifest_hash_mismatch_in_the_cache(served, torch_home):
    real = sha256_of(served / SMALL)
    with FileServer(served) as server:
        fetch_checkpoint(_source(server.url), progress=False)
        # The same cached file, now declared (by a manifest update) with another hash.
        (cache_dir() / f"{SMALL}.sha256.json").unlink()
        with pytest.raises(WeightsUnavailableError, match="expected " + "e" * 64):
            fetch_checkpoint(_source(server.url, sha256="e" * 64), progress=False)
        path, _ = fetch_checkpoint(_source(server.url, sha256=real), progress=False)
    assert sha256_of(path) == real


# --- end to end: the model never sees damaged weights -----------------------------------------

TIMM_ARCH = "seresnext26d_32x4d"
SAFETENSORS = "seresnext26d_32x4d.bt_in1k.safetensors"  # the manifest's alternative source


@pytest.mark.slow
def test_build_model_refetches_a_corrupted_safetensors_file(tmp_path, torch_home, monkeypatch):
    served = tmp_path / "mirror"
    served.mkdir()
    state = random_state_dict(TIMM_ARCH, seed=3)
    save_file({k: v.contiguous() for k, v in state.items()}, served / SAFETENSORS)
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        build_model(TIMM_ARCH, progress=False)  # the primary .pth is absent: the alternative is used
        cached = cache_dir() / SAFETENSORS
        _corrupt_middle(cached, 4096)
        model = build_model(TIMM_ARCH, progress=False)
        assert server.requests[f"/{SAFETENSORS}"] == 2
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert sha256_of(cached) == sha256_of(served / SAFETENSORS)


# --- the maintainer command that records hashes (always on a copy of the manifest) -----------


def test_manifest_tool_records_sha256_and_size_then_downloads_are_checked(served, tmp_path, torch_home, capsys):
    from resnext_hub.models.weights import MANIFEST_PATH, parse_manifest
    from tools.manifest_tool import EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, main

    original = MANIFEST_PATH.read_bytes()
    copy = tmp_path / "manifest.json"
    copy.write_bytes(original)
    name = "resnext101_32x4d.ngc_20.06"
    file_name = parse_manifest(json.loads(original))[name].file_name
    published = tmp_path / file_name
    published.write_bytes((served / SMALL).read_bytes())

    assert main(["--manifest", str(copy), "--check", str(published)]) == EXIT_MISMATCH  # nothing recorded yet
    assert main(["--manifest", str(copy), str(published)]) == EXIT_OK
    record = parse_manifest(json.loads(copy.read_text()))[name]
    assert record.source.sha256 == sha256_of(published) and record.source.size_bytes == published.stat().st_size
    assert "manifest_tool" in record.integrity_note
    assert main(["--manifest", str(copy), "--check", str(published)]) == EXIT_OK
    assert MANIFEST_PATH.read_bytes() == original  # the repo's manifest is never touched by tests

    # From now on a download of another file under that name is refused.
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    (impostor / file_name).write_bytes(published.read_bytes())
    _corrupt_middle(impostor / file_name)  # same size: only the hash tells
    with FileServer(impostor) as server:
        with pytest.raises(WeightsUnavailableError, match=f"expected {record.source.sha256}"):
            fetch_checkpoint((replace(record.source, url=f"{server.url}/{file_name}"),), progress=False)
    assert _cache_listing() == []

    # A different file is not recorded over the first without --force; names must be known.
    assert main(["--manifest", str(copy), str(impostor / file_name)]) == EXIT_USAGE
    assert "pass --force" in capsys.readouterr().err
    unknown = tmp_path / "unknown.pth"
    unknown.write_bytes(b"x")
    assert main(["--manifest", str(copy), str(unknown)]) == EXIT_USAGE
    assert "no manifest source has file_name 'unknown.pth'" in capsys.readouterr().err


def test_manifest_tool_refuses_a_file_that_contradicts_its_published_prefix(served, tmp_path, capsys):
    from resnext_hub.models.weights import MANIFEST_PATH
    from tools.manifest_tool import EXIT_USAGE, main

    copy = tmp_path / "manifest.json"
    copy.write_bytes(MANIFEST_PATH.read_bytes())
    damaged = tmp_path / "seresnext26d_32x4d-80fa48a3.pth"  # timm's name: sha256 starts with 80fa48a3
    damaged.write_bytes((served / SMALL).read_bytes())
    assert main(["--manifest", str(copy), str(damaged)]) == EXIT_USAGE
    assert "does not start with 80fa48a3" in capsys.readouterr().err
    assert copy.read_bytes() == MANIFEST_PATH.read_bytes()


@pytest.mark.slow
def test_manifest_tool_runs_as_a_module(served, tmp_path):
    from resnext_hub.models.weights import MANIFEST_PATH

    copy = tmp_path / "manifest.json"
    copy.write_bytes(MANIFEST_PATH.read_bytes())
    published = tmp_path / "seresnext26d_32x4d.bt_in1k.safetensors"  # an alternative source's name
    published.write_bytes((served / SMALL).read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "tools.manifest_tool", "--manifest", str(copy), str(published)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"sha256={sha256_of(published)}" in result.stdout
    entry = json.loads(copy.read_text())["weights"]["seresnext26d_32x4d.bt_in1k"]["alternatives"][0]
    assert entry["sha256"] == sha256_of(published) and entry["size_bytes"] == published.stat().st_size
