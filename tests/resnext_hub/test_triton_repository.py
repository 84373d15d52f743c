"""The exported Triton repository: its layout, configs generated from the contract, the top-k classifier, validation.

The repository is the ``triton_repo`` fixture (tests/conftest.py), written by the command line.
"""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from resnext_hub.export import DEFAULT_OPSET, TRACE_BATCH
from resnext_hub.models import build_model
from resnext_hub.processing import imagenet_labels
from resnext_hub.triton.config import TritonConfigError, build_classifier_config, config_text, model_roles
from resnext_hub.triton.contract import Contract
from resnext_hub.triton.validation import (
    contract_problems,
    onnx_signature,
    read_config,
    validate_model_dir,
    validate_repository,
)

ARCH = "seresnext26d_32x4d"
CROP = 224  # the weights' crop size: the image ensemble preprocesses at it
CONTRACT = Contract(ARCH, CROP, 1000, 5)  # the fixture's: export's default --top-k 5
ROLES = model_roles(CONTRACT)
FP32, INT64, STRING = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_STRING


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return build_model(ARCH, pretrained_from_file=small_checkpoint)


def _io(entries) -> list[tuple[str, int, list[int]]]:
    return [(entry.name, entry.data_type, list(entry.dims)) for entry in entries]


@pytest.mark.slow  # exports a repository
def test_repository_layout_and_configs(triton_repo):
    # The contract's two models, the models they run; no staging leftovers.
    assert sorted(p.name for p in triton_repo.iterdir()) == sorted(ROLES.values())
    classifier = triton_repo / ROLES["classifier"]
    assert sorted(p.name for p in classifier.iterdir()) == ["1", "config.pbtxt"]
    assert (classifier / "1" / "model.onnx").is_file()
    plain = (
        triton_repo.parent / "plain"
    )  # a Triton container running as another user can read what a plain open() writes
    plain.write_bytes(b"")
    modes = {
        stat.S_IMODE(path.stat().st_mode) for path in (classifier / "1" / "model.onnx", classifier / "config.pbtxt")
    }
    assert modes == {stat.S_IMODE(plain.stat().st_mode)}
    config = read_config(classifier / "config.pbtxt")  # Triton's own schema
    assert (config.name, config.platform, config.max_batch_size) == (ROLES["classifier"], "onnxruntime_onnx", 16)
    assert _io(config.input) == [("input", FP32, [3, CROP, CROP])]
    assert _io(config.output) == [("probabilities", FP32, [5]), ("indices", INT64, [5])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_CPU, 2)]
    assert validate_model_dir(classifier).name == ROLES["classifier"]

    configs = validate_repository(triton_repo)  # every folder, and the ensembles' wiring
    assert contract_problems(configs, CONTRACT) == []
    answer = [("labels", STRING, [5]), ("probabilities", FP32, [5]), ("indices", INT64, [5]), ("error", STRING, [1])]
    tensor, image = configs[ARCH], configs[f"{ARCH}_image"]
    assert (tensor.platform, image.platform, tensor.max_batch_size) == ("ensemble", "ensemble", 16)
    assert _io(tensor.input) == [("input", FP32, [3, CROP, CROP])] and _io(tensor.output) == answer
    assert _io(image.input) == [("image", STRING, [1])] and _io(image.output) == answer
    assert [s.model_name for s in tensor.ensemble_scheduling.step] == [ROLES["classifier"], ROLES["postprocess"]]
    steps = [s.model_name for s in image.ensemble_scheduling.step]
    assert steps == [ROLES["preprocess"], ROLES["classifier"], ROLES["image_postprocess"]]
    preprocess = configs[ROLES["preprocess"]]
    assert (preprocess.backend, preprocess.max_batch_size) == ("python", 16)
    assert _io(preprocess.input) == [("image", STRING, [1])]
    assert _io(preprocess.output) == [("input", FP32, [3, CROP, CROP]), ("error", STRING, [1])]
    assert list(preprocess.dynamic_batching.preferred_batch_size) == [4, 8]
    assert "error" not in [i.name for i in configs[ROLES["postprocess"]].input]
    assert "error" in [i.name for i in configs[ROLES["image_postprocess"]].input]
    for name in (ARCH, f"{ARCH}_image"):
        assert list((triton_repo / name / "1").iterdir()) == []  # the version folder Triton needs
    labels = (triton_repo / ROLES["postprocess"] / "1" / "labels.json").read_text(encoding="utf-8")
    assert labels.startswith('[\n"tench, Tinca tinca",\n') and len(imagenet_labels()) == 1000


@pytest.mark.slow  # exports a repository
def test_classifier_answers_the_eager_top_k_with_a_dynamic_batch(triton_repo, model):
    path = triton_repo / ROLES["classifier"] / "1" / "model.onnx"
    graph = onnx.load(str(path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == DEFAULT_OPSET
    assert graph.ir_version == 8  # opset 18, IR 8: the ONNX Runtime 1.14 of older Triton containers reads it
    assert [node.op_type for node in graph.graph.node][-2:] == ["Softmax", "TopK"]  # plain ops: ORT and TensorRT
    signature = onnx_signature(path)
    assert signature["inputs"] == {"input": ("TYPE_FP32", ["batch", 3, CROP, CROP])}
    top_k = {"probabilities": ("TYPE_FP32", ["batch", 5]), "indices": ("TYPE_INT64", ["batch", 5])}
    assert signature["outputs"] == top_k
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == list(model.classes.names)
    assert json.loads(metadata["preprocessing"]) == model.preprocessing.as_dict()
    for batch in (1, 5):  # neither is the batch it was traced with
        assert batch != TRACE_BATCH
        x = torch.randn(batch, 3, CROP, CROP, generator=torch.Generator().manual_seed(batch))
        values, indices = session.run(["probabilities", "indices"], {"input": x.numpy()})
        with torch.inference_mode():
            expected = model(x).softmax(1).topk(5)
        assert indices.dtype == np.int64 and indices.tolist() == expected.indices.tolist()
        np.testing.assert_allclose(values, expected.values.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow  # exports a repository
def test_validation_catches_what_triton_would_refuse(triton_repo, tmp_path):
    source = triton_repo / ROLES["classifier"]
    text = (source / "config.pbtxt").read_text()

    def broken(name: str, new_text: str, labels: int | None = None):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        (folder / "config.pbtxt").write_text(new_text)
        if labels is not None:
            (folder / "labels.txt").write_text("x\n" * labels)
        with pytest.raises(TritonConfigError) as caught:
            validate_model_dir(folder)
        return str(caught.value)

    name = ROLES["classifier"]
    assert "differs from the folder name" in broken("renamed", text)
    assert f"dims [3, 32, 32] in config, [3, {CROP}, {CROP}] in the graph" in broken(
        name + "_a", text.replace(f"dims: {CROP}", "dims: 32")
    )
    assert "not a valid Triton model config" in broken(name + "_b", text + "\nmax_batch: 3\n")
    assert "output names" in broken(name + "_c", text.replace('"indices"', '"classes"'))
    assert "data_type TYPE_FP32 in config, TYPE_INT64 in the graph" in broken(
        name + "_d", text.replace("TYPE_INT64", "TYPE_FP32")
    )
    labelled = text.replace('name: "probabilities"', 'name: "probabilities"\n  label_filename: "labels.txt"')
    assert "999 lines in labels.txt, 5 classes" in broken(name + "_e", labelled, labels=999)
    assert "preferred_batch_size [32]" in broken(
        name + "_f", text.replace("preferred_batch_size: 8", "preferred_batch_size: 32")
    )


@pytest.mark.slow  # exports a repository
def test_repository_validation_checks_the_ensemble_wiring_and_the_contract(triton_repo, tmp_path):
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

    preprocess = ROLES["preprocess"]
    assert "no such model in the repository" in problems(lambda repo: shutil.rmtree(repo / preprocess))
    assert "no version folder 1/" in problems(lambda repo: (repo / ensemble / "1").rmdir())
    assert "no 1/model.py (the Python backend's entry point)" in problems(
        lambda repo: (repo / preprocess / "1" / "model.py").unlink()
    )
    assert "output 'indices' is ('INT64', (6,)) in the config, ('INT64', (5,)) from step 3" in problems(
        config(text.replace("dims: 5\n", "dims: 6\n"))
    )
    # The preprocessing model's output does not fit the classifier's input any more.
    preprocess_config = f"{preprocess}/config.pbtxt"
    assert f"input 'input' is ('FP32', (3, {CROP}, {CROP})), 'preprocessed' from step 1" in problems(
        lambda repo: (repo / preprocess_config).write_text(
            (repo / preprocess_config).read_text().replace(f"dims: {CROP}", "dims: 64")
        )
    )
    wired = 'input_map {\n      key: "input"\n      value: "preprocessed"'
    assert text.count(wired) == 1
    assert "reads 'preprocesed', which nothing produces" in problems(
        config(text.replace(wired, wired.replace("preprocessed", "preprocesed")))
    )
    bigger = config(text.replace("max_batch_size: 16", "max_batch_size: 32"))
    assert "max_batch_size 16 < the ensemble's 32" in problems(bigger)

    # A repository that is valid for Triton but answers another contract.
    configs = validate_repository(triton_repo)
    del configs[ensemble].output[3]  # no error output
    configs[ARCH].output[0].dims[0] = 4  # a top-4
    found = contract_problems(configs, CONTRACT)
    assert len(found) == 2 and found[0].startswith(f"{ARCH}: outputs {{'labels': ('BYTES', (4,))")
    assert found[1].startswith(f"{ensemble}: outputs") and "'error'" not in found[1].split("the contract's")[0]
    assert contract_problems({ARCH: configs[ARCH]}, CONTRACT, image_model=True)[-1] == (
        f"no model '{ensemble}' (the contract's)"
    )


def test_gpu_tensorrt_config_round_trips_and_bad_options_are_refused(tmp_path):
    contract = Contract("m", 224, 10, 5)
    config = build_classifier_config(contract, instance_kind="gpu", instance_count=2, accelerator="tensorrt", fp16=True)
    (tmp_path / "config.pbtxt").write_text(config_text(config))
    parsed = read_config(tmp_path / "config.pbtxt")
    assert parsed == config
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(parsed.instance_group[0].KIND_GPU, 2)]
    trt = parsed.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert (trt.name, trt.parameters["precision_mode"]) == ("tensorrt", "FP16")
    with pytest.raises(TritonConfigError) as caught:
        build_classifier_config(contract, max_batch_size=4, preferred_batch_sizes=(8,), instance_kind="cpu",
                                accelerator="tensorrt")  # fmt: skip
    assert len(caught.value.problems) == 2 and "needs GPU instances" in str(caught.value)
