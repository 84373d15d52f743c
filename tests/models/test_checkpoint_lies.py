"""Checkpoint files that lie about their own structure, met on the download, cache and mirror paths.

Whatever a served, cached or mirrored file claims, loading it gives the documented error
(WeightsUnavailableError or CheckpointError, never another exception type) and leaves nothing
in the cache to be trusted later. Servers are real sockets on 127.0.0.1; files are real files.
"""

from __future__ import annotations

import io
import pickle
import socket
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, CheckpointError, WeightsUnavailableError, build_model, read_checkpoint
from resnext_hub.models.checkpoint import load_weights
from resnext_hub.models.download import cache_dir, fetch_checkpoint
from resnext_hub.models.weights import Source
from tools.fake_checkpoints import NGC_FILES

TIMM_ARCH = "seresnext26d_32x4d"
SAFETENSORS = "seresnext26d_32x4d.bt_in1k.safetensors"  # the manifest's alternative source (no published hash)
NGC_ARCH = "resnext101_32x4d"  # built on the meta device: cheap whatever its size
NGC_FILE = NGC_FILES[NGC_ARCH]  # sha256 null in the manifest: trust on first use

F32_PAIR = b'{"dtype": "F32", "shape": [2], '
LYING_HEADERS = {
    "list": (b"[]", b""),
    "string": (b'"text"', b""),
    "offsets-are-strings": (b'{"fc.weight": ' + F32_PAIR + b'"data_offsets": ["0", "8"]}}', b"\0" * 8),
    "offset-is-null": (b'{"fc.weight": ' + F32_PAIR + b'"data_offsets": [0, null]}}', b"\0" * 8),
    "offset-null-among-others": (
        b'{"a": ' + F32_PAIR + b'"data_offsets": [0, 8]}, "b": ' + F32_PAIR + b'"data_offsets": [8, null]}}',
        b"\0" * 16,
    ),
    "offsets-reversed": (b'{"fc.weight": ' + F32_PAIR + b'"data_offsets": [8, 0]}}', b""),
    "nested-too-deep": (b"[" * 100_000 + b"]" * 100_000, b""),
}
# Offsets that add up, a shape that does not: only reading the file tells.
SHAPE_LIES = (b'{"fc.weight": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 8]}}', b"\0" * 8)


def _safetensors_bytes(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


def _cache_listing() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- safetensors headers that lie ---------------------------------------------------------------


@pytest.mark.parametrize("lie", [*sorted(LYING_HEADERS), "shape-lies"])
def test_a_served_safetensors_file_whose_header_lies_is_refused_and_not_cached(lie, tmp_path, torch_home, monkeypatch):
    served = tmp_path / "mirror"
    served.mkdir()
    header, body = LYING_HEADERS.get(lie, SHAPE_LIES)
    (served / SAFETENSORS).write_bytes(_safetensors_bytes(header, body))
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises((WeightsUnavailableError, CheckpointError)) as caught:
            build_model(TIMM_ARCH, progress=False)
        assert server.requests[f"/{SAFETENSORS}"] == 1
    assert SAFETENSORS in str(caught.value)
    assert _cache_listing() == []  # no file, no stamp, no temporary file


@pytest.mark.parametrize("lie", sorted(LYING_HEADERS))
def test_a_cached_safetensors_file_whose_header_lies_is_replaced(lie, tmp_path, torch_home):
    """Copied into the cache by hand (no stamp): its header is checked, it is deleted and fetched again."""
    name = "weights.safetensors"
    served = tmp_path / "served"
    served.mkdir()
    save_file({"w": torch.arange(4.0)}, served / name)
    cache_dir().mkdir(parents=True)
    header, body = LYING_HEADERS[lie]
    (cache_dir() / name).write_bytes(_safetensors_bytes(header, body))
    with FileServer(served) as server:
        path, _ = fetch_checkpoint((Source(f"{server.url}/{name}", name, "safetensors"),), progress=False)
        assert server.requests[f"/{name}"] == 1
    assert path.read_bytes() == (served / name).read_bytes()


@pytest.mark.parametrize("lie", sorted(LYING_HEADERS))
def test_a_cached_safetensors_file_whose_header_lies_never_stays_when_offline(lie, torch_home, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    cache_dir().mkdir(parents=True)
    header, body = LYING_HEADERS[lie]
    (cache_dir() / SAFETENSORS).write_bytes(_safetensors_bytes(header, body))
    with pytest.raises(WeightsUnavailableError, match="could not download"):
        build_model(TIMM_ARCH, progress=False)
    assert _cache_listing() == []


@pytest.mark.parametrize("lie", ["list", "offsets-are-strings", "shape-lies"])
def test_a_mirror_folder_safetensors_file_whose_header_lies_is_named_and_kept(lie, tmp_path, torch_home, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    header, body = LYING_HEADERS.get(lie, SHAPE_LIES)
    content = _safetensors_bytes(header, body)
    (folder / SAFETENSORS).write_bytes(content)
    monkeypatch.setenv(MIRROR_ENV, str(folder))
    with pytest.raises(CheckpointError) as caught:
        build_model(TIMM_ARCH, progress=False)
    message = str(caught.value)
    assert str(folder / SAFETENSORS) in message and MIRROR_ENV in message and "replace" in message
    assert (folder / SAFETENSORS).read_bytes() == content  # used in place: never deleted
    assert _cache_listing() == []


# --- torch files that lie -----------------------------------------------------------------------


def _torch_bytes(state: object, **options) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, **options)
    return buffer.getvalue()


def _rezip(data: bytes, *, drop: str = "", compression: int = zipfile.ZIP_STORED, pad_pkl: int = 0) -> bytes:
    """A copy of torch zip ``data`` without records ending in ``drop``; data.pkl padded with zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", compression) as target:
        for record in source.infolist():
            if drop and record.filename.endswith(drop):
                continue
            content = source.read(record)
            if record.filename.endswith("/data.pkl"):
                content += b"\0" * pad_pkl
            target.writestr(record.filename, content)
    return out.getvalue()


def _not_torch_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "photos of cats")
        archive.writestr("cats/1.jpg", b"\xff\xd8" + b"\0" * 100)
    return out.getvalue()


def _lying_torch_file(kind: str) -> bytes:
    state = {"fc.weight": torch.randn(8, 8), "fc.bias": torch.randn(8)}
    good = _torch_bytes(state)
    if kind == "zip-without-data.pkl":
        return _rezip(good, drop="/data.pkl")
    if kind == "zip-without-a-storage":
        return _rezip(good, drop="/data/0")
    if kind == "zip-that-is-no-checkpoint":
        return _not_torch_zip()
    if kind == "zip-bomb":  # data.pkl declares 64 MiB once inflated, from a file of about 64 KiB
        return _rezip(good, compression=zipfile.ZIP_DEFLATED, pad_pkl=64 << 20)
    if kind == "pickle-that-is-no-checkpoint":
        return pickle.dumps({"fc.weight": [1.0, 2.0]}, protocol=2)
    if kind == "legacy-cut-short":
        legacy = _torch_bytes(state, _use_new_zipfile_serialization=False)
        return legacy[: len(legacy) // 2]
    raise AssertionError(kind)


TORCH_LIES = [
    "legacy-cut-short",
    "pickle-that-is-no-checkpoint",
    "zip-bomb",
    "zip-that-is-no-checkpoint",
    "zip-without-a-storage",
    "zip-without-data.pkl",
]


@pytest.mark.parametrize("kind", TORCH_LIES)
def test_a_served_torch_file_whose_structure_lies_never_stays_in_the_cache(kind, tmp_path, torch_home, monkeypatch):
    served = tmp_path / "mirror"
    served.mkdir()
    (served / NGC_FILE).write_bytes(_lying_torch_file(kind))
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises((WeightsUnavailableError, CheckpointError)) as caught:
            build_model(NGC_ARCH, progress=False)
    assert NGC_FILE in str(caught.value)
    assert _cache_listing() == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_zip_bomb_is_refused_before_torch_unpacks_it(tmp_path):
    """torch allocates what a zip record declares: a file that claims 1000 times its size is refused unread."""
    path = tmp_path / "fine.pth"  # control: the same re-zipping without the padding reads
    path.write_bytes(_rezip(_torch_bytes({"w": torch.ones(2)}), compression=zipfile.ZIP_DEFLATED))
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))
    path = tmp_path / "bomb.pth"
    path.write_bytes(_lying_torch_file("zip-bomb"))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="once unpacked") as caught:
        read_checkpoint(path)
    assert str(path) in str(caught.value)


# --- tensors that cannot be weights -------------------------------------------------------------


class _Head(torch.nn.Module):
    """A model as small as can be, with ResNet's head names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 3)


def _sparse(v: torch.Tensor) -> torch.Tensor:
    return v.to_sparse()


def _quantized(v: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(v, 0.1, 0, torch.qint8)


def _complex(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.complex64)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation notes for quantized and sparse tensors
@pytest.mark.parametrize("make", [_sparse, _quantized, _complex], ids=["sparse", "quantized", "complex"])
def test_tensors_that_cannot_be_weights_are_a_checkpoint_error(make, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"fc.weight": torch.randn(3, 2), "fc.bias": make(torch.randn(3))}, path)
    with pytest.raises(CheckpointError, match=r"cannot be weights of this model .*: fc\.bias") as caught:
        load_weights(_Head(), read_checkpoint(path), source=str(path))
    assert str(path) in str(caught.value)


def test_float8_weights_are_checked_and_loaded_in_the_models_type(tmp_path):
    """isfinite has no float8 kernel: the check must not turn a loadable file into a NotImplementedError."""
    weight = torch.randn(3, 2).to(torch.float8_e4m3fn)
    path = tmp_path / "fp8.pth"
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(3)}, path)
    model = _Head()
    load_weights(model, read_checkpoint(path))
    assert model.fc.weight.dtype == torch.float32 and torch.equal(model.fc.weight, weight.float())
    weight[0, 0] = float("nan")
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor.*fc.weight"):
        load_weights(_Head(), read_checkpoint(path))


def test_a_model_without_a_head_loads(tmp_path):
    """load_weights takes any module: one without ResNet's fc must not fail on the head check."""
    path = tmp_path / "linear.pth"
    torch.save({"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, path)
    model = torch.nn.Linear(2, 3)
    load_weights(model, read_checkpoint(path))
    assert torch.equal(model.weight, torch.ones(3, 2))
