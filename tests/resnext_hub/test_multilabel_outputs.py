"""A multi-label model through the shared path: the engine ranks by sigmoid and marks the labels above threshold,
the one record writer carries them (JSON ``labels``, CSV ``above_threshold``, text), the Triton contract answers
``above_threshold``."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_hub.engine import Engine
from resnext_hub.models import build_model
from resnext_hub.models.finetuned import finetuned_checkpoint
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import ClassList
from resnext_hub.processing.presets import as_preset
from resnext_hub.results import MULTI_LABEL_CSV_HEADER, Result, read_csv, text_lines, write_csv
from resnext_hub.triton import contract

ARCH = "seresnext26d_32x4d"
LABELS = ClassList.of(["sea", "sky", "tree"])
THRESHOLDS = (0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    weights = build_model(ARCH, pretrained=False, num_classes=3).state_dict()
    preset = replace(as_preset(None), resize_size=73, crop_size=64)
    path = tmp_path_factory.mktemp("multilabel") / "best.pth"
    content = finetuned_checkpoint(
        weights, architecture=ARCH, classes=LABELS, preprocessing=preset, thresholds=list(THRESHOLDS)
    )
    torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(build_model(ARCH, pretrained_from_file=checkpoint), InferenceOptions(precision="fp32", workers=1))


def _logits(probabilities):
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def test_the_engine_ranks_every_label_by_sigmoid_and_marks_those_above_threshold(engine):
    assert engine.multi_label and engine.thresholds == THRESHOLDS
    assert engine.clamp_k(1) == 3  # every label's probability, whatever the top-k
    logits = _logits([[0.5, 0.7, 0.1], [0.2, 0.59, 0.95]])
    ranked = engine.rank(logits, k=1)
    assert [[p.label for p in row] for row in ranked] == [["sky", "sea", "tree"], ["tree", "sky", "sea"]]
    assert [p.probability for p in ranked[0]] == pytest.approx([0.7, 0.5, 0.1], abs=1e-6)  # not a softmax
    assert engine.above_threshold(logits) == [("sea", "sky"), ("tree",)]


def test_classify_gives_each_labels_probability_and_the_labels_above_threshold(engine, tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(path)
    (result,) = engine.classify([str(path)])
    image = engine.preprocessing(Image.open(path).convert("RGB"))[None]
    probabilities = engine.logits(image).sigmoid()[0]
    assert sorted(p.label for p in result.predictions) == list(LABELS.names)
    for prediction in result.predictions:
        assert prediction.probability == pytest.approx(float(probabilities[prediction.index]), abs=1e-6)
    assert result.labels == tuple(n for n, p, t in zip(LABELS.names, probabilities, THRESHOLDS) if p >= t)


def test_the_record_in_every_format(engine):
    ranked = engine.rank(_logits([[0.5, 0.7, 0.1]]))[0]
    record = Result("a.jpg", predictions=ranked, labels=("sea", "sky")).as_record()
    assert record["labels"] == ["sea", "sky"] and json.loads(json.dumps(record)) == record
    assert "labels" not in Result("b.jpg", predictions=ranked).as_record()  # single-label records are as before
    failed = Result("c.jpg", error="not an image").as_record()
    out = io.StringIO()
    write_csv([record, failed], out, multi_label=True)
    lines = out.getvalue().splitlines()
    assert lines[0].split(",") == list(MULTI_LABEL_CSV_HEADER)
    assert [line.rsplit(",", 1)[1] for line in lines[1:4]] == ["1", "1", "0"]  # sky, sea above; tree not
    assert read_csv(io.StringIO(out.getvalue())) == [record, failed]
    assert "labels: sea, sky" in text_lines(record)
    assert "labels: (none)" in text_lines({**record, "labels": []})


def test_the_triton_contract_answers_above_threshold_for_a_multi_label_model():
    spec = contract.Contract("m", 64, 3, 3, THRESHOLDS)
    assert spec.output(contract.ABOVE_THRESHOLD) == contract.TensorSpec(contract.ABOVE_THRESHOLD, "BOOL", (3,))
    assert contract.ABOVE_THRESHOLD not in {s.name for s in contract.Contract("m", 64, 3, 2).outputs}
    with pytest.raises(ValueError, match="answers every label"):
        contract.Contract("m", 64, 3, 2, THRESHOLDS)
    probabilities = np.array([[0.7, 0.5, 0.1], [0.95, 0.59, 0.2], [0.9, 0.8, 0.7]], np.float32)
    indices = np.array([[1, 0, 2], [2, 1, 0], [0, 1, 2]])
    answered = contract.answer(
        probabilities, indices, contract.encode_labels(LABELS.names), ["", "", "broken"], THRESHOLDS
    )
    assert answered[contract.ABOVE_THRESHOLD].tolist() == [
        [True, True, False],  # sky 0.7 >= 0.6, sea 0.5 >= 0.3, tree 0.1 < 0.9
        [True, False, False],  # tree 0.95 >= 0.9, sky 0.59 < 0.6, sea 0.2 < 0.3
        [False, False, False],  # a failed sample
    ]
    assert contract.ABOVE_THRESHOLD not in contract.answer(probabilities, indices, contract.encode_labels(LABELS.names))


def test_a_multi_label_predict_job_writes_every_label_whatever_the_top_k():
    from resnext_hub.predict import describe_job

    job = describe_job(model=ARCH, weights=None, num_classes=10, top_k=5, multi_label=True)
    assert job["top_k"] == 10 and job["multi_label"] is True
    assert "multi_label" not in describe_job(model=ARCH, weights=None, num_classes=10, top_k=5)  # as before


def test_evaluate_scores_a_multi_label_model_on_a_labels_file(checkpoint, tmp_path):
    from resnext_hub.evaluate import evaluate_multi_label
    from resnext_hub.metrics import mean_average_precision

    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "val.csv").write_text("0.png,sea;sky\n1.png,tree\n2.png,\n", encoding="utf-8")
    model = build_model(ARCH, pretrained_from_file=checkpoint)
    options = InferenceOptions(precision="fp32", workers=0, device="cpu")
    summary = evaluate_multi_label(model, tmp_path / "val.csv", options)
    images = torch.stack([model.preprocessing(Image.open(tmp_path / f"{i}.png")) for i in range(3)])
    with torch.inference_mode():
        probabilities = model(images).sigmoid()
    targets = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert summary["evaluated"] == 3 and summary["multi_label"]
    assert summary["map"] == pytest.approx(100 * mean_average_precision(probabilities, targets), abs=1e-4)
    assert set(summary["average_precision"]) == set(LABELS.names)
    (tmp_path / "other.csv").write_text("0.png,cloud\n", encoding="utf-8")
    with pytest.raises(ValueError, match="label 'cloud' is not one of"):
        evaluate_multi_label(model, tmp_path / "other.csv", options)
    model.reset_classifier(3, classes=LABELS)  # single-label again
    with pytest.raises(ValueError, match="this model is single-label"):
        evaluate_multi_label(model, tmp_path / "val.csv", options)
