"""The Triton contract, and everything generated from it agreeing with it, without a server.

Every config of the exported repository is generated for several contracts and written into a real
folder (the classifier: a small ONNX graph ending in the export's top-k), then checked with Triton's
schema, the ensembles' wiring and the contract; ``serve``'s PyTriton tensor specs are held to the
same contract.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from resnext_hub.engine import clamp_top_k
from resnext_hub.export.onnx_file import INPUT_NAME, OUTPUT_NAMES
from resnext_hub.triton import contract
from resnext_hub.triton.classifier import end_in_top_k
from resnext_hub.triton.config import MODEL_FILE, PYTHON_MODEL_FILE, config_text, model_roles, repository_configs
from resnext_hub.triton.server import pytriton_tensor
from resnext_hub.triton.validation import contract_problems, model_kind, tensors, validate_repository

CONTRACTS = [
    contract.Contract("seresnext26d_32x4d", 224, 1000, 5),
    contract.Contract("shapes", 64, 3, clamp_top_k(5, 3)),  # a fine-tuned head: k clamped to its 3 classes
    contract.Contract("one", 32, 10, 1),
]


def test_the_contracts_models():
    mine = CONTRACTS[1]
    assert mine.k == 3
    assert [(m.name, [(s.name, s.datatype, s.dims) for s in m.inputs]) for m in mine.models] == [
        ("shapes", [("input", "FP32", (3, 64, 64))]),
        ("shapes_image", [("image", "BYTES", (1,))]),
    ]
    answer = [("labels", "BYTES", (3,)), ("probabilities", "FP32", (3,)), ("indices", "INT64", (3,))]
    answer.append(("error", "BYTES", (1,)))  # on both models: one client reads either
    for model in mine.models:
        assert [(s.name, s.datatype, s.dims) for s in model.outputs] == answer
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3 .*got 5"):
        contract.Contract("shapes", 64, 3, 5)
    with pytest.raises(ValueError, match="got 0"):
        contract.Contract("shapes", 64, 3, 0)


def test_answer_names_the_classes_and_blanks_failed_samples():
    labels = contract.encode_labels(["circle", "square", "triangle"])
    probabilities = np.array([[0.7, 0.2], [0.5, 0.4], [np.nan, 0.1], [0.6, 0.3]], np.float32)
    indices = np.array([[2, 0], [1, 2], [0, 1], [-1, -1]])
    errors = ["", "", "", "truncated or corrupt\nJPEG"]
    out = contract.answer(probabilities, indices, labels, errors)
    assert list(out) == ["labels", "probabilities", "indices", "error"]
    assert out["labels"].tolist() == [[b"triangle", b"circle"], [b"square", b"triangle"], [b"", b""], [b"", b""]]
    assert out["indices"].dtype == np.int64 and out["indices"].tolist() == [[2, 0], [1, 2], [-1, -1], [-1, -1]]
    assert out["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(out["probabilities"], np.float32([[0.7, 0.2], [0.5, 0.4], [0, 0], [0, 0]]))
    # One line each; the NaN row is a failure of its own (not finite), the others are answered.
    expected_errors = [b"", b"", contract.NON_FINITE.encode(), b"truncated or corrupt\\nJPEG"]
    assert out["error"].shape == (4, 1) and out["error"][:, 0].tolist() == expected_errors
    assert contract.answer(probabilities[:2], indices[:2], labels)["error"].tolist() == [[b""], [b""]]
    with pytest.raises(ValueError, match="1 error reasons for 2 samples"):
        contract.answer(probabilities[:2], indices[:2], labels, [""])


def _classifier_graph(size: int, classes: int) -> onnx.ModelProto:
    """What the ONNX export gives, small: ``input`` -> ``logits`` and ``probabilities``, batch axis dynamic."""
    weights = np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], [OUTPUT_NAMES[0]]),
        helper.make_node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes]) for name in OUTPUT_NAMES],
        [helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.ravel())],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("image_ensemble", [True, False])
@pytest.mark.parametrize("served", CONTRACTS, ids=lambda c: c.name)
def test_every_generated_config_agrees_with_the_contract(served, image_ensemble, tmp_path):
    configs = repository_configs(served, image_ensemble=image_ensemble, max_batch_size=8, preferred_batch_sizes=[4])
    roles = model_roles(served)
    assert set(configs) == {roles[r] for r in roles if image_ensemble or r in ("tensor", "classifier", "postprocess")}
    assert contract_problems(configs, served, image_model=image_ensemble) == []
    for name, config in configs.items():  # a repository Triton would load, as far as it can be checked here
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text(config_text(config))
        if model_kind(config) == "python":
            (tmp_path / name / "1" / PYTHON_MODEL_FILE).write_text("")
    classifier = end_in_top_k(_classifier_graph(served.image_size, served.num_classes), served.k)
    onnx.save(classifier, str(tmp_path / roles["classifier"] / "1" / MODEL_FILE))
    assert set(validate_repository(tmp_path)) == set(configs)  # the graph, every config and the wiring agree
    # The graph answers the contract's top-k.
    session = onnxruntime.InferenceSession(classifier.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, *served.tensor_input.dims)).astype(np.float32)
    values, indices = session.run([contract.PROBABILITIES, contract.INDICES], {contract.INPUT: x})
    assert values.shape == indices.shape == (2, served.k) and indices.dtype == np.int64
    assert (np.diff(values, axis=1) <= 0).all()  # best first
    # serve publishes the same models, from the same contract, as PyTriton tensor specs.
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.bytes_): "BYTES"}
    for model in served.models if image_ensemble else (served.tensor_model,):
        for specs, declared in ((model.inputs, configs[model.name].input), (model.outputs, configs[model.name].output)):
            bound = [pytriton_tensor(spec) for spec in specs]
            assert {t.name: (datatypes[np.dtype(t.dtype)], tuple(t.shape)) for t in bound} == tensors(declared)
