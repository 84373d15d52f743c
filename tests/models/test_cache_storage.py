"""Read-only, missing and full caches, and cache entries that are not what they seem.

Tests run as root (CI too), and root ignores file permissions: read-only and unwritable folders
are made real by running the load in a child process that drops to user ``nobody``. A full disk
is a child process with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail
with EFBIG, as writes to a full disk fail with ENOSPC. Children import from this worktree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from rawserver import RawServer, reply
from safetensors.torch import save_file
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, WeightsUnavailableError, download
from resnext_hub.models.download import cache_dir, fetch_checkpoint
from resnext_hub.models.integrity import sha256_of
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import NGC_FILES, random_state_dict

NOBODY = 65534
ARCH = "seresnext26d_32x4d"
SAFETENSORS = "seresnext26d_32x4d.bt_in1k.safetensors"  # the manifest's alternative source: no published hash
SMALL = "small.pth"
# A whole safetensors file smaller than its own stamp (about 120 bytes): lets a size limit fail the stamp alone.
TINY = "tiny.safetensors"
TINY_HEADER = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
TINY_BYTES = len(TINY_HEADER).to_bytes(8, "little") + TINY_HEADER + b"\x07"
STAMP_FAILS_AT = 100  # bytes: over TINY_BYTES, under any stamp


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(
    code: str,
    *args: str,
    env: dict[str, str],
    other_user: bool = False,
    max_file_bytes: int | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter importing this worktree (no weights mirror unless ``env`` sets one),
    as user nobody (``other_user``, when running as root) and/or under a file size limit."""

    def limit() -> None:
        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        if other_user and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    inherited = {k: v for k, v in os.environ.items() if k != MIRROR_ENV}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=full_env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# What a child prints: the error's type and message, or OK and the path it got.
FETCH = """
import sys
from resnext_hub.models.download import fetch_checkpoint
from resnext_hub.models.weights import Source
try:
    source = Source(url=sys.argv[1], file_name=sys.argv[2], file_format=sys.argv[3])
    path, _ = fetch_checkpoint((source,), progress=False)
except Exception as error:
    print(type(error).__name__, error)
else:
    print("OK", path)
"""


@pytest.fixture
def shared():
    """A folder user nobody can enter (pytest's own temporary folders are root's alone); removed after."""
    folder = Path(tempfile.mkdtemp(prefix="resnext-hub-cache-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def other_user_can_run():
    """Skip unless a child can be someone the file permissions apply to, and can still import this worktree."""
    if os.geteuid() != 0:
        return  # permissions already apply to this user
    try:
        result = _child("import resnext_hub.models", env={}, other_user=True)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot run a child process as user nobody ({error}): read-only folders cannot be made real")
    if result.returncode != 0:
        pytest.skip(f"user nobody cannot import the worktree at {ROOT}: {result.stderr[-300:]}")


def _read_only(*folders: Path) -> None:
    for folder in folders:
        folder.chmod(0o555)


# --- read-only caches -----------------------------------------------------------------------------


# A child's build_model from its cache (debug logging on), printing a digest of the weights it got.
BUILD_AND_DIGEST = """
import hashlib, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from resnext_hub.models import build_model
state = build_model("seresnext26d_32x4d", progress=False).state_dict()
digest = hashlib.sha256()
for key in sorted(state):
    digest.update(key.encode() + state[key].contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_a_read_only_cache_filled_by_an_admin_is_used(other_user_can_run, shared):
    """The air-gapped case: a read-only $TORCH_HOME/hub/checkpoints volume holding a copied-in checkpoint."""
    home = shared / "torch_home"
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = random_state_dict(ARCH, seed=2)
    save_file({k: v.contiguous() for k, v in state.items()}, cache / SAFETENSORS)
    (cache / SAFETENSORS).chmod(0o644)
    _read_only(cache, cache.parent, home)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].contiguous().numpy().tobytes())
    result = _child(BUILD_AND_DIGEST, env={"TORCH_HOME": str(home), "HOME": str(shared)}, other_user=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [digest.hexdigest()]
    assert "no stamp written" in result.stderr  # said at debug level
    assert _listing(cache) == [SAFETENSORS]


@pytest.mark.slow
def test_a_damaged_file_in_a_read_only_cache_is_a_clear_error(other_user_can_run, shared):
    home = shared / "torch_home"
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"w": torch.randn(256)}, shared / SMALL)
    (cache / SMALL).write_bytes((shared / SMALL).read_bytes()[:-200])  # cut short
    _read_only(cache, cache.parent, home)
    with FileServer(shared) as server:
        result = _child(FETCH, f"{server.url}/{SMALL}", SMALL, "torch", env={"TORCH_HOME": str(home)}, other_user=True)
    assert result.stdout.startswith("WeightsUnavailableError"), result.stdout + result.stderr[-3000:]
    assert f"{cache / SMALL} is damaged" in result.stdout and "could not be deleted" in result.stdout
    assert "TORCH_HOME" in result.stdout and MIRROR_ENV in result.stdout
    assert _listing(cache) == [SMALL]


@pytest.mark.slow
def test_a_wrong_file_in_a_read_only_cache_is_named_for_the_admin(other_user_can_run, shared):
    """Pre-filled with another model's file: it cannot be forgotten, so the error says what to do by hand."""
    home = shared / "torch_home"
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = NGC_FILES["resnext101_32x4d"]  # sha256 null in the manifest: nothing but loading it can tell
    torch.save({"fc.weight": torch.zeros(10, 8)}, cache / name)
    (cache / name).chmod(0o644)
    _read_only(cache, cache.parent, home)
    code = """
from resnext_hub.models import build_model
try:
    build_model("resnext101_32x4d", progress=False)
except Exception as error:
    print(type(error).__name__, error)
"""
    result = _child(code, env={"TORCH_HOME": str(home)}, other_user=True)
    message = result.stdout
    assert message.startswith("CheckpointError"), message + result.stderr[-3000:]
    assert "does not fit" in message and f"{cache / name} could not be deleted" in message
    assert "Permission denied" in message and "by hand" in message
    assert _listing(cache) == [name]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["torch-home-cannot-be-created", "cache-folder-is-read-only"])
def test_an_unwritable_cache_is_a_clear_error(where, other_user_can_run, shared):
    torch.save({"w": torch.randn(256)}, shared / SMALL)
    locked = shared / "locked"
    locked.mkdir()
    home = locked / "torch_home"
    if where == "cache-folder-is-read-only":
        (home / "hub" / "checkpoints").mkdir(parents=True)
        _read_only(home / "hub" / "checkpoints")
    _read_only(locked)
    with FileServer(shared) as server:
        result = _child(FETCH, f"{server.url}/{SMALL}", SMALL, "torch", env={"TORCH_HOME": str(home)}, other_user=True)
    message = result.stdout
    assert message.startswith("WeightsUnavailableError"), message + result.stderr[-3000:]
    assert str(home / "hub") in message and "Permission denied" in message
    assert "Set TORCH_HOME to a writable folder" in message and MIRROR_ENV in message
    assert "pretrained_from_file" in message
    assert not list(locked.rglob("*.partial")) and not list(locked.rglob(f"*{SMALL}*"))


# --- full disks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stamp_that_cannot_be_written_leaves_nothing_behind(tmp_path, torch_home):
    """The file fits, its stamp does not: neither stays (no file without its stamp), nor any temporary file."""
    (tmp_path / TINY).write_bytes(TINY_BYTES)
    assert len(TINY_BYTES) < STAMP_FAILS_AT
    with FileServer(tmp_path) as server:
        result = _child(FETCH, f"{server.url}/{TINY}", TINY, "safetensors", env={}, max_file_bytes=STAMP_FAILS_AT)
        assert _listing(cache_dir()) == []
        assert result.stdout.startswith("WeightsUnavailableError"), result.stdout + result.stderr[-3000:]
        assert "File too large" in result.stdout and "nothing was kept" in result.stdout
        path, _ = fetch_checkpoint((Source(f"{server.url}/{TINY}", TINY, "safetensors"),), progress=False)
    assert path.read_bytes() == TINY_BYTES  # control: without the limit, the same download is kept
    assert _listing(cache_dir()) == [TINY, f"{TINY}.sha256.json"]


@pytest.mark.slow
def test_a_verified_cached_file_is_used_when_its_stamp_cannot_be_written(torch_home):
    cache_dir().mkdir(parents=True)
    (cache_dir() / TINY).write_bytes(TINY_BYTES)  # copied in by hand: no stamp yet
    url = f"http://127.0.0.1:{_closed_port()}/{TINY}"
    result = _child(FETCH, url, TINY, "safetensors", env={}, max_file_bytes=STAMP_FAILS_AT)
    assert result.stdout.split() == ["OK", str(cache_dir() / TINY)], result.stdout + result.stderr[-3000:]
    assert _listing(cache_dir()) == [TINY]  # no stamp, no temporary stamp file


@pytest.mark.parametrize(
    "content_length, size_bytes, reason",
    [
        (10**15, None, "bytes free: nothing was downloaded"),
        (10**15, None, "1000000000000000 bytes is over the cap"),
        (10**6, 100, "size 1000000 bytes (its Content-Length), expected 100"),
    ],
    ids=["more-than-the-disk-holds", "more-than-any-checkpoint", "not-the-manifest-size"],
)
def test_a_huge_content_length_is_refused_before_writing(
    content_length, size_bytes, reason, request, torch_home, monkeypatch
):
    if "disk" in request.node.callspec.id:  # the cap on any download (8 GiB) would refuse it first
        monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", 1 << 62, raising=False)
    with RawServer(reply(b"x" * 100, content_length=content_length)) as server:
        with pytest.raises(WeightsUnavailableError, match=re.escape(reason)):
            fetch_checkpoint((Source(f"{server.url}/{SMALL}", SMALL, size_bytes=size_bytes),), progress=False)
    assert _listing(cache_dir()) == []


# --- cache entries and stamps that are not what they seem ---------------------------------------


@pytest.fixture
def cached_small(tmp_path, torch_home):
    """(server folder, cached path): a torch file downloaded once into the cache, stamped."""
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.randn(256)}, served / SMALL)
    with FileServer(served) as server:
        path, _ = fetch_checkpoint((Source(f"{server.url}/{SMALL}", SMALL),), progress=False)
    return served, path


@pytest.mark.parametrize(
    "stamp",
    [{"sha256": 5}, {"sha256": "not a digest"}, {"sha256": "AB" * 32}],
    ids=["digest-not-a-string", "digest-not-hex", "digest-upper-case"],
)
def test_a_stamp_of_the_wrong_shape_is_ignored_not_trusted(stamp, cached_small):
    """A stamp is a record, not a command: one that is no digest must not condemn a good file forever."""
    served, path = cached_small
    stamp_path = path.with_name(SMALL + ".sha256.json")
    stamp_path.write_text(json.dumps({**stamp, "size": 1, "mtime_ns": 1}))
    with FileServer(served) as server:
        again, _ = fetch_checkpoint((Source(f"{server.url}/{SMALL}", SMALL),), progress=False)
        assert server.requests[f"/{SMALL}"] == 0  # re-verified in place
    assert again == path and json.loads(stamp_path.read_text())["sha256"] == sha256_of(path)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["stamp-is-a-fifo", "file-is-a-fifo"])
def test_a_fifo_in_the_cache_never_hangs_a_load(entry, cached_small):
    """Opening a FIFO waits for a writer that never comes: the load must not open one."""
    served, path = cached_small
    target = path if entry == "file-is-a-fifo" else path.with_name(SMALL + ".sha256.json")
    target.unlink()
    os.mkfifo(target)
    with FileServer(served) as server:
        try:
            result = _child(FETCH, f"{server.url}/{SMALL}", SMALL, "torch", env={}, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the load hung on the {entry}")
    assert result.stdout.split() == ["OK", str(path)], result.stdout + result.stderr[-3000:]
    assert stat.S_ISREG(path.stat().st_mode) and sha256_of(path) == sha256_of(served / SMALL)


def test_a_cache_entry_that_is_a_folder_is_a_clear_error(tmp_path, torch_home):
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.randn(4)}, served / SMALL)
    (cache_dir() / SMALL / "notes").mkdir(parents=True)
    with FileServer(served) as server:
        with pytest.raises(
            WeightsUnavailableError, match=re.escape(f"the cache entry {cache_dir() / SMALL} is a folder")
        ):
            fetch_checkpoint((Source(f"{server.url}/{SMALL}", SMALL),), progress=False)
    assert (cache_dir() / SMALL / "notes").is_dir()  # someone's folder: never deleted


@pytest.mark.parametrize("entry", ["folder", "broken-link"])
def test_a_mirror_folder_entry_that_is_no_file_is_named(entry, tmp_path, torch_home, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    if entry == "folder":
        (mirror / SMALL).mkdir()
    else:
        (mirror / SMALL).symlink_to(tmp_path / "gone.pth")
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    why = "it is a folder" if entry == "folder" else f"it is a broken symbolic link to {tmp_path / 'gone.pth'}"
    with pytest.raises(WeightsUnavailableError, match=f"has no file '{SMALL}'") as caught:
        fetch_checkpoint((Source(f"http://127.0.0.1:{_closed_port()}/{SMALL}", SMALL),), progress=False)
    assert why in str(caught.value)
    assert os.path.lexists(mirror / SMALL)
