"""Checkpoints that would run code when unpickled are refused, and the code never runs,
even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from servers import FileServer

from resnext_hub.models import MIRROR_ENV, CheckpointError, build_model, read_checkpoint, seresnext26d_32x4d
from tools.fake_checkpoints import NGC_FILES

# Small and 101-layer models: refusal happens before any model is built, so both are cheap.
ARCH = "resnext101_32x4d"


class _RunsCode:
    """Unpickling this calls ``func(*args)``: what a hostile checkpoint does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    python = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": _RunsCode(exec, python),
        "builtins.eval": _RunsCode(eval, f"__import__('builtins').{python}"),
        "subprocess.call": _RunsCode(subprocess.call, ["touch", str(marker)]),
    }


def _write(kind: str, payload: object, path: Path) -> Path:
    """A hostile checkpoint: the payload hidden among real tensors, in several container formats."""
    state = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": payload}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "zip-training-wrapper":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 90, "optimizer": payload}, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as an attacker would hand-craft it
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


KINDS = ["zip", "zip-training-wrapper", "legacy", "raw-pickle"]
PAYLOADS = ["os.system", "builtins.exec", "builtins.eval", "subprocess.call"]


@pytest.fixture(autouse=True)
def _force_unsafe_loading(monkeypatch):
    """The environment variable that makes torch.load unpickle anything when a call leaves weights_only unset."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_a_checkpoint_never_runs(kind, payload, tmp_path):
    marker = tmp_path / "marker"
    path = _write(kind, _payloads(marker)[payload], tmp_path / "evil.pth")
    # The payload is real: plain pickle would run it (a control, so the refusal below means something).
    if kind == "raw-pickle" and payload == "os.system":
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    with pytest.raises(CheckpointError, match="refused: it holds Python objects other than tensors") as caught:
        read_checkpoint(path)
    assert str(path) in str(caught.value) and "Nothing from it was executed" in str(caught.value)
    assert "weights_only` set to `False` will likely succeed" not in str(caught.value)  # no unsafe advice
    with pytest.raises(CheckpointError):
        build_model(ARCH, pretrained_from_file=path)
    with pytest.raises(CheckpointError):
        seresnext26d_32x4d(pretrained_from_file=str(path))
    assert not marker.exists()


def test_a_hostile_download_is_refused_too(tmp_path, torch_home, monkeypatch):
    """The download path (no published hash: trust on first use) loads with the same refusal."""
    served = tmp_path / "served"
    served.mkdir()
    marker = tmp_path / "marker"
    _write("zip", _payloads(marker)["os.system"], served / NGC_FILES[ARCH])
    with FileServer(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises(CheckpointError, match="refused"):
            build_model(ARCH, progress=False)
        assert server.requests[f"/{NGC_FILES[ARCH]}"] == 1
    assert not marker.exists()


@pytest.mark.slow
def test_refused_in_a_fresh_interpreter_started_with_the_variable(tmp_path):
    """The variable set before Python starts (as a user's shell would) changes nothing."""
    marker = tmp_path / "marker"
    path = _write("zip", _payloads(marker)["os.system"], tmp_path / "evil.pth")
    code = "import sys; from resnext_hub.models import read_checkpoint; read_checkpoint(sys.argv[1])"
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "CheckpointError" in result.stderr and "refused" in result.stderr
    assert not marker.exists()


def test_training_checkpoints_of_plain_data_still_load(tmp_path):
    """weights_only refuses code, not the ordinary contents of a training checkpoint."""
    weights = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    path = tmp_path / "train.pth.tar"
    torch.save({"epoch": 90, "arch": "x", "best_prec1": 80.0, "state_dict": weights, "optimizer": {"lr": 0.1}}, path)
    loaded = read_checkpoint(path)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    "content",
    [b"", b"<!DOCTYPE html><html>Sign in to continue</html>", b"PK\x03\x04" + b"\0" * 100, b"\x80\x02garbage"],
    ids=["empty", "html", "broken-zip", "broken-pickle"],
)
def test_unreadable_files_give_checkpoint_error(content, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)


def test_broken_safetensors_give_checkpoint_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(path)
