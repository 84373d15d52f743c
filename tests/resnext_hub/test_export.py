"""ONNX, TorchScript, pt2 and Triton-repository export: real files, run and compared with eager."""

from __future__ import annotations

import json
import os
import shutil
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
from tritonclient.grpc import model_config_pb2

from resnext_hub import cli
from resnext_hub.export import (
    BF16_TOLERANCE,
    DEFAULT_OPSET,
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
from resnext_hub.processing import imagenet_labels
from resnext_hub.triton import (
    TritonConfigError,
    build_config,
    config_text,
    onnx_signature,
    read_config,
    validate_model_dir,
    validate_repository,
)
from tools.fake_checkpoints import write_ngc_file

ARCH = "seresnext26d_32x4d"
SIZE = 64  # every property here holds at any input size; 64 keeps the forward passes (and compiles) cheap
CROP = 224  # the weights' crop size: the Triton repository's (tests/conftest.py), whose ensemble preprocesses images


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint):
    return build_model(ARCH, pretrained_from_file=checkpoint)


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


def test_triton_repository_layout_and_config(triton_repo, tmp_path):
    model_dir = triton_repo / ARCH
    # The classifier, the preprocessing model and the ensemble; no staging leftovers.
    assert sorted(p.name for p in triton_repo.iterdir()) == [ARCH, f"{ARCH}_image", f"{ARCH}_preprocess"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert (model_dir / "1" / "model.onnx").is_file()
    (triton_repo.parent / "plain").write_bytes(b"")  # a Triton container running as another user can read it
    assert (
        _mode(model_dir / "1" / "model.onnx")
        == _mode(model_dir / "config.pbtxt")
        == _mode(triton_repo.parent / "plain")
    )
    config = read_config(model_dir / "config.pbtxt")  # Triton's own schema
    assert (config.name, config.platform, config.max_batch_size) == (ARCH, "onnxruntime_onnx", 16)
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, CROP, CROP])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", [1000], "labels.txt"),
        ("probabilities", [1000], "labels.txt"),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_CPU, 2)]
    labels = (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == imagenet_labels() and labels[0] == "tench, Tinca tinca"
    assert validate_model_dir(model_dir).name == ARCH

    configs = validate_repository(triton_repo)  # every folder, and the ensemble's wiring
    preprocess, ensemble = configs[f"{ARCH}_preprocess"], configs[f"{ARCH}_image"]
    assert (preprocess.backend, preprocess.max_batch_size) == ("python", 16)
    assert [(i.name, i.data_type, list(i.dims)) for i in preprocess.input] == [
        ("image", model_config_pb2.TYPE_STRING, [1])
    ]
    assert [(o.name, list(o.dims)) for o in preprocess.output] == [("input", [3, CROP, CROP])]
    assert list(preprocess.dynamic_batching.preferred_batch_size) == [4, 8]
    assert (ensemble.platform, ensemble.max_batch_size) == ("ensemble", 16)
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [f"{ARCH}_preprocess", ARCH]
    assert [(o.name, o.label_filename) for o in ensemble.output] == [("probabilities", "labels.txt")]
    assert (triton_repo / f"{ARCH}_image" / "labels.txt").read_text(encoding="utf-8").splitlines() == labels
    assert list((triton_repo / f"{ARCH}_image" / "1").iterdir()) == []  # the version folder Triton needs


def test_triton_onnx_has_dynamic_batch_and_matches_eager(triton_repo, model):
    path = triton_repo / ARCH / "1" / "model.onnx"
    graph = onnx.load(str(path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == DEFAULT_OPSET
    signature = onnx_signature(path)
    assert signature["inputs"]["input"][1][0] == "batch" and signature["inputs"]["input"][1][1:] == [3, CROP, CROP]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # neither is the batch it was traced with
        assert batch != TRACE_BATCH
        x = torch.randn(batch, 3, CROP, CROP, generator=torch.Generator().manual_seed(batch))
        logits, probabilities = session.run(None, {"input": x.numpy()})
        expected = _eager(model, x)
        assert logits.shape == (batch, 1000)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=FP32_TOLERANCE * max(1, np.abs(expected).max()))
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_validation_catches_what_triton_would_refuse(triton_repo, tmp_path):
    source = triton_repo / ARCH
    config_text = (source / "config.pbtxt").read_text()

    def broken(name: str, text: str, labels: int | None = None):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        (folder / "config.pbtxt").write_text(text)
        if labels is not None:
            (folder / "labels.txt").write_text("x\n" * labels)
        with pytest.raises(TritonConfigError) as caught:
            validate_model_dir(folder)
        return str(caught.value)

    assert "differs from the folder name" in broken("renamed", config_text)
    assert f"dims [3, 32, 32] in config, [3, {CROP}, {CROP}] in the graph" in broken(
        ARCH + "_a", config_text.replace(f"dims: {CROP}", "dims: 32")
    )
    assert "not a valid Triton model config" in broken(ARCH + "_b", config_text + "\nmax_batch: 3\n")
    assert "output names" in broken(ARCH + "_c", config_text.replace('"logits"', '"scores"'))
    assert "999 lines in labels.txt, 1000 classes" in broken(ARCH + "_d", config_text, labels=999)
    assert "preferred_batch_size [32]" in broken(
        ARCH + "_e", config_text.replace("preferred_batch_size: 8", "preferred_batch_size: 32")
    )


def test_repository_validation_checks_the_ensemble_wiring(triton_repo, tmp_path):
    ensemble = f"{ARCH}_image"
    text = (triton_repo / ensemble / "config.pbtxt").read_text()

    def problems(edit) -> str:
        repo = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        shutil.copytree(triton_repo, repo)
        edit(repo)
        with pytest.raises(TritonConfigError) as caught:
            validate_repository(repo)
        return str(caught.value)

    def config(new: str):
        return lambda repo: (repo / ensemble / "config.pbtxt").write_text(new)

    assert "no such model in the repository" in problems(lambda repo: shutil.rmtree(repo / f"{ARCH}_preprocess"))
    assert "no version folder 1/" in problems(lambda repo: (repo / ensemble / "1").rmdir())
    assert "no 1/model.py (the Python backend's entry point)" in problems(
        lambda repo: (repo / f"{ARCH}_preprocess" / "1" / "model.py").unlink()
    )
    assert "is ('TYPE_FP32', [1001]) in the config, ('TYPE_FP32', [1000]) from step 2" in problems(
        config(text.replace("dims: 1000", "dims: 1001"))
    )
    # The preprocessing model's output does not fit the classifier's input any more.
    preprocess = f"{ARCH}_preprocess/config.pbtxt"
    assert f"input 'input' is ('TYPE_FP32', [3, {CROP}, {CROP}]), 'preprocessed' from step 1" in problems(
        lambda repo: (repo / preprocess).write_text(
            (repo / preprocess).read_text().replace(f"dims: {CROP}", "dims: 64")
        )
    )
    wired = 'input_map {\n      key: "input"\n      value: "preprocessed"'
    assert text.count(wired) == 1
    assert "reads 'preprocesed', which nothing produces" in problems(
        config(text.replace(wired, wired.replace("preprocessed", "preprocesed")))
    )
    bigger = config(text.replace("max_batch_size: 16", "max_batch_size: 32"))
    assert "max_batch_size 16 < the ensemble's 32" in problems(bigger)


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


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_traced_frozen_and_verified(model, tmp_path):
    result = export_torchscript(model, tmp_path / "m.pt", image_size=SIZE)
    assert all(c.max_abs_diff <= FP32_TOLERANCE for c in result.checks)
    loaded = torch.jit.load(str(result.path))
    assert list(loaded.parameters()) == []  # frozen: weights are constants of the graph
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), _eager(model, x), rtol=0, atol=FP32_TOLERANCE)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


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


def test_nvidia_model_exports_to_onnx(tmp_path):
    """One 101-layer NVIDIA model, from its NGC-layout file, through the whole ONNX path."""
    ngc = write_ngc_file(tmp_path / "ngc", "se_resnext101_32x4d", seed=1)
    nvidia = build_model("se_resnext101_32x4d", pretrained_from_file=ngc)
    result = export_onnx(nvidia, tmp_path / "se101.onnx", image_size=32, verify_batches=(1,))
    check = result.checks[0]
    assert check.batch_size == 1 and check.top1_agrees
    assert check.max_abs_diff <= FP32_TOLERANCE * max(1, check.logit_scale)
    assert onnx_signature(result.path)["outputs"]["logits"][1] == ["batch", 1000]


def test_gpu_tensorrt_config_round_trips_and_bad_options_are_refused(tmp_path):
    config = build_config(
        "m", image_size=224, num_classes=10, instance_kind="gpu", instance_count=2, accelerator="tensorrt", fp16=True
    )
    (tmp_path / "config.pbtxt").write_text(config_text(config))
    parsed = read_config(tmp_path / "config.pbtxt")
    assert parsed == config
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(parsed.instance_group[0].KIND_GPU, 2)]
    trt = parsed.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert (trt.name, trt.parameters["precision_mode"]) == ("tensorrt", "FP16")
    with pytest.raises(TritonConfigError) as caught:
        build_config("m", image_size=224, num_classes=10, max_batch_size=4, preferred_batch_sizes=(8,),
                     instance_kind="cpu", accelerator="tensorrt")  # fmt: skip
    assert len(caught.value.problems) == 2 and "needs GPU instances" in str(caught.value)


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


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 pt2 packages are for CPUs with native bf16")
def test_pt2_bf16_package_within_its_bound(model, pt2_fp32, tmp_path):
    result = export_pt2(model, tmp_path / "b.pt2", image_size=SIZE, precision="bf16")
    assert result.dtype == "bf16" and [c.batch_size for c in result.checks] == [1, 3]
    for check in result.checks:
        assert 0 < check.max_abs_diff <= BF16_TOLERANCE * max(1, check.logit_scale) and check.top1_agrees
    assert result.path.stat().st_size < 0.6 * pt2_fp32.stat().st_size  # bf16 weights: half the bytes
    assert {"export_s", "compile_s", "load_s", "first_call_s"} <= set(result.timings)


def test_pt2_refuses_what_it_cannot_build(model, tmp_path):
    with pytest.raises(ValueError, match="fp16 pt2 packages are for CUDA"):
        export_pt2(model, tmp_path / "h.pt2", precision="fp16")
    with pytest.raises(ExportError, match="pt2 export of _BatchTwoOnly failed"):
        export_pt2(_BatchTwoOnly(), tmp_path / "bad.pt2", image_size=SIZE)  # a batch branch cannot be exported
    assert list(tmp_path.iterdir()) == []
