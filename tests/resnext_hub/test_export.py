"""ONNX, TorchScript and pt2 export: real files, run and compared with eager (the Triton repository:
test_triton_repository.py)."""

from __future__ import annotations

import json
import os
import stat
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import ROOT
from torch import nn

from resnext_hub import cli
from resnext_hub.export import (
    BF16_TOLERANCE,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    TRACE_BATCH,
    ExportError,
    export_onnx,
    export_pt2,
    export_torchscript,
    run_isolated,
)
from resnext_hub.models import build_model
from resnext_hub.models.cpu import cpu_has_native_bf16
from resnext_hub.triton.validation import onnx_signature
from tools.fake_checkpoints import write_ngc_file

ARCH = "seresnext26d_32x4d"
SIZE = 64  # every property here holds at any input size; 64 keeps the forward passes (and compiles) cheap


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint):
    return build_model(ARCH, pretrained_from_file=checkpoint)


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


def test_fp16_onnx_within_stated_bound(model, tmp_path):
    result = export_onnx(model, tmp_path / "m16.onnx", image_size=SIZE, fp16=True)
    graph = onnx.load(str(result.path))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    assert onnx_signature(result.path)["inputs"]["input"][0] == "TYPE_FP32"  # casts are inside the graph
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    logits = session.run(["logits"], {"input": x.numpy()})[0]
    expected = _eager(model, x)
    diff = np.abs(logits - expected).max()
    assert 0 < diff <= FP16_TOLERANCE * max(1, np.abs(expected).max())  # really fp16, and within the bound
    assert [c.batch_size for c in result.checks] == [1, 3] and all(c.passed for c in result.checks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m16.onnx"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_traced_frozen_and_verified(model, tmp_path):
    result = export_torchscript(model, tmp_path / "m.pt", image_size=SIZE)
    assert all(c.max_abs_diff <= FP32_TOLERANCE for c in result.checks)
    loaded = torch.jit.load(str(result.path))
    assert list(loaded.parameters()) == []  # frozen: weights are constants of the graph
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), _eager(model, x), rtol=0, atol=FP32_TOLERANCE)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exported_files_have_a_plain_files_mode_and_no_staging_name_inside(model, tmp_path, umask_022):
    # 0644 like every other file a user writes: a Triton container running as another user can read them.
    onnx_file = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, verify_batches=(1,)).path
    torchscript = export_torchscript(model, tmp_path / "m.pt", image_size=SIZE, verify_batches=(1,)).path
    (tmp_path / "plain").write_bytes(b"")
    assert _mode(onnx_file) == _mode(torchscript) == _mode(tmp_path / "plain") == 0o644
    # Written through a Python file (so that a full disk is an OSError), the archive's folder is torch's "archive".
    names = zipfile.ZipFile(torchscript).namelist()
    assert names and all(name.startswith("archive/") for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt", "plain"]  # no staging leftovers


class _BatchTwoOnly(nn.Module):
    """Right only at the traced batch size: the bug that verification at other sizes exists to catch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.mean((2, 3)).repeat(1, 4)
        return scores * 2 if x.shape[0] == 2 else scores


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_an_export_that_does_not_generalise_is_refused_and_removed(tmp_path):
    with pytest.raises(ExportError, match="does not match the eager model on batch 1"):
        export_torchscript(_BatchTwoOnly(), tmp_path / "bad.pt", image_size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_command_reports_errors(tmp_path, capsys, checkpoint):
    assert cli.main(["export", "--model", ARCH, "--random-weights", "--format", "torchscript", "--precision", "fp16",
                     "-o", str(tmp_path / "m.pt")]) == 2  # fmt: skip
    expected = (
        "--format torchscript is written in fp32, not fp16: for --precision fp16 use --format onnx or pt2 or triton"
    )
    assert expected in capsys.readouterr().err
    refused = {"for --precision bf16 use --format pt2": ["--format", "onnx", "--precision", "bf16"]}
    if torch.cuda.is_available():  # elsewhere, --device cuda is refused first: see below
        refused["--device applies to pt2 exports"] = ["--format", "onnx", "--device", "cuda"]
    # Devices are checked for every command before the model loads (resnext_hub.arguments).
    refused["device 'gpu' is not a device name"] = ["--format", "pt2", "--device", "gpu"]
    if not torch.backends.mps.is_available():
        refused["device 'mps' requested but MPS is not available"] = ["--format", "pt2", "--device", "mps"]
    if not torch.cuda.is_available():
        refused["device 'cuda' requested but CUDA is not available"] = ["--format", "pt2", "--device", "cuda"]
    for message, extra in refused.items():
        assert cli.main(["export", "--model", ARCH, "--random-weights", "-o", str(tmp_path / "m"), *extra]) == 2
        assert message in capsys.readouterr().err
    argv = ["export", "--model", ARCH, "--random-weights", "--image-size", "64", "-o", str(tmp_path / "r")]
    assert cli.main(argv) == 2  # the ensemble preprocesses at the weights' crop size
    assert "classifier is exported at 64x64: drop --image-size or add --no-image-ensemble" in capsys.readouterr().err
    (tmp_path / "repo" / ARCH).mkdir(parents=True)
    argv = ["export", "--model", ARCH, "--checkpoint", str(checkpoint), "-o", str(tmp_path / "repo")]
    assert cli.main(argv) == 2  # before the model loads
    assert f"{tmp_path / 'repo' / ARCH} already exists: pass --overwrite to replace it" in capsys.readouterr().err


@pytest.mark.slow
def test_nvidia_model_exports_to_onnx(tmp_path):
    """One 101-layer NVIDIA model, from its NGC-layout file, through the whole ONNX path."""
    ngc = write_ngc_file(tmp_path / "ngc", "se_resnext101_32x4d", seed=1)
    nvidia = build_model("se_resnext101_32x4d", pretrained_from_file=ngc)
    result = export_onnx(nvidia, tmp_path / "se101.onnx", image_size=32, verify_batches=(1,))
    check = result.checks[0]
    assert check.batch_size == 1 and check.top1_agrees
    assert check.max_abs_diff <= FP32_TOLERANCE * max(1, check.logit_scale)
    assert onnx_signature(result.path)["outputs"]["logits"][1] == ["batch", 1000]


@pytest.mark.slow  # a fresh interpreter
def test_isolated_process_has_no_access_to_this_repository():
    probe = """
import json, sys, torch
try:
    import resnext_hub
    found = resnext_hub.__file__
except ModuleNotFoundError as error:
    found = str(error)
print(json.dumps({"resnext_hub": found, "path": sys.path, "torch": torch.__version__}))
"""
    done = run_isolated(probe)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["resnext_hub"].startswith("No module named 'resnext_hub'")
    assert seen["torch"] == torch.__version__  # the same environment, less this repository
    venv = os.path.realpath(sys.prefix)  # a .venv inside the checkout keeps its packages, nothing else of it
    inside = [p for p in seen["path"] if p.startswith(str(ROOT)) and not os.path.realpath(p).startswith(venv)]
    assert not [p for p in seen["path"] if p in ("", ".")] and not inside


@pytest.fixture(scope="module")
def pt2_fp32(checkpoint, tmp_path_factory):
    """An fp32 pt2 package written by the command line (one AOTInductor compile, ~20-40 s here)."""
    folder = tmp_path_factory.mktemp("pt2")
    argv = ["export", "--model", ARCH, "--checkpoint", str(checkpoint), "--format", "pt2", "--image-size", str(SIZE)]
    assert cli.main([*argv, "-o", str(folder / "m.pt2")]) == 0
    return folder / "m.pt2"


@pytest.mark.slow
def test_pt2_package_has_a_plain_files_mode_and_no_staging_name_inside(pt2_fp32, tmp_path):
    (tmp_path / "plain").write_bytes(b"")  # the umask this process ran the export under
    assert _mode(pt2_fp32) == _mode(tmp_path / "plain")
    names = zipfile.ZipFile(pt2_fp32).namelist()  # packaged in memory: the folder is torch's "archive"
    assert names and all(name.startswith("archive/") for name in names), names[:5]
    assert not [name for name in names if ".partial" in name or ".tmp" in name]
    # The class names travel in the archive's extra/ folder, readable by torch's own PT2 archive reader.
    from torch.export.pt2_archive._package import PT2ArchiveReader

    with PT2ArchiveReader(str(pt2_fp32)) as archive:
        labels = json.loads(archive.read_string("extra/labels.json"))
    assert labels == {"classes": list(build_model(ARCH, pretrained=False).classes.names), "multi_label": False}


@pytest.mark.slow  # an AOTInductor compile and a fresh interpreter
def test_pt2_package_runs_without_the_repository_and_matches_eager(pt2_fp32, model, tmp_path):
    assert sorted(p.name for p in pt2_fp32.parent.iterdir()) == ["m.pt2"]  # no staging leftovers
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    torch.save(x, tmp_path / "x.pt")
    run = """
import sys, torch
compiled = torch._inductor.aoti_load_package(sys.argv[1])
with torch.inference_mode():
    torch.save(compiled(torch.load(sys.argv[2])), sys.argv[3])
"""
    done = run_isolated(run, str(pt2_fp32), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    assert done.returncode == 0, done.stderr
    logits, expected = torch.load(tmp_path / "y.pt").numpy(), _eager(model, x)
    assert logits.shape == (5, 1000) and 5 != TRACE_BATCH
    np.testing.assert_allclose(logits, expected, rtol=0, atol=FP32_TOLERANCE * max(1, np.abs(expected).max()))


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 pt2 packages are for CPUs with native bf16")
def test_pt2_bf16_package_within_its_bound(model, pt2_fp32, tmp_path):
    result = export_pt2(model, tmp_path / "b.pt2", image_size=SIZE, precision="bf16")
    assert result.dtype == "bf16" and [c.batch_size for c in result.checks] == [1, 3]
    for check in result.checks:
        assert 0 < check.max_abs_diff <= BF16_TOLERANCE * max(1, check.logit_scale) and check.top1_agrees
    assert result.path.stat().st_size < 0.6 * pt2_fp32.stat().st_size  # bf16 weights: half the bytes
    assert {"export_s", "compile_s", "load_s", "first_call_s"} <= set(result.timings)


@pytest.mark.slow
def test_pt2_refuses_what_it_cannot_build(model, tmp_path):
    with pytest.raises(ValueError, match="fp16 pt2 packages are for CUDA"):
        export_pt2(model, tmp_path / "h.pt2", precision="fp16")
    with pytest.raises(ExportError, match="pt2 export of _BatchTwoOnly failed"):
        export_pt2(_BatchTwoOnly(), tmp_path / "bad.pt2", image_size=SIZE)  # a batch branch cannot be exported
    assert list(tmp_path.iterdir()) == []
