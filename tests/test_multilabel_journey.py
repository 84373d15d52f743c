"""One multi-label fine-tuned checkpoint through every door, as a user walks it (README, "Multi-label").

``finetune --multi-label`` on generated images holding any of three colour-coded shapes (labels in
``train.csv``/``val.csv``), then the same ``best.pth`` through ``torch.hub.load``, ``classify``, ``evaluate``,
``predict``, ``export`` (ONNX, TorchScript, a Triton repository), ``serve`` and the web demo. Every door must know
the model is multi-label: sigmoid probabilities for every label, the same labels above the same thresholds (exact
fp32).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.http as httpclient
from conftest import ROOT, uploaded
from triton_servers import ServeProcess

from resnext_hub import cli
from resnext_hub.export.labels import TORCHSCRIPT_FILE
from resnext_hub.processing import load_image
from resnext_hub.triton import contract
from resnext_hub.triton.repository import THRESHOLDS_FILE
from tools.shapes_dataset import CLASSES, write_multilabel_shapes

pytestmark = pytest.mark.slow  # trains, exports and starts a Triton server

ARCH = "seresnext26d_32x4d"
FP32 = ["--precision", "fp32"]


def _run(argv: list[str]) -> None:
    assert cli.main([*argv, "--no-progress"] if argv[0] in ("finetune", "predict") else argv) == 0, argv


def test_a_multi_label_checkpoint_works_through_every_door(tmp_path, capsys, monkeypatch):
    data = write_multilabel_shapes(tmp_path / "shapes", train=16, val=8, size=40, seed=1)
    out = tmp_path / "run"
    # 1. finetune --multi-label: a sigmoid head for the three shapes, mAP recorded, thresholds chosen.
    train = ["--model", ARCH, "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "8", *FP32]
    _run(["finetune", str(data), "--multi-label", *train, "--workers", "0", "-o", str(out)])
    summary = json.loads(capsys.readouterr().out)
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= metrics["val_map"] <= 100 and summary["best_val_map"] == metrics["val_map"]
    assert summary["multi_label"] and summary["classes"] == list(CLASSES)
    assert (out / "curves.png").stat().st_size > 0
    best = out / "best.pth"
    ckpt = ["--model", ARCH, "--checkpoint", str(best)]

    # The hub door: the multi-label model with its labels and the thresholds validation chose.
    model = torch.hub.load(str(ROOT), ARCH, source="local", pretrained_from_file=str(best))
    assert model.multi_label and model.classes.names == tuple(CLASSES)
    thresholds = np.array(model.thresholds)
    assert thresholds.tolist() == pytest.approx(metrics["thresholds"], abs=1e-6)
    paths = sorted(str(p) for p in (data / "images").glob("val_*.png"))
    batch = torch.stack([model.preprocessing(load_image(path)) for path in paths])
    with torch.inference_mode():
        eager = model(batch).sigmoid().numpy()
    expected = {path: [CLASSES[i] for i in np.flatnonzero(row >= thresholds)] for path, row in zip(paths, eager)}

    # 2. classify: every label's probability (sigmoid), and the labels above threshold.
    _run(["classify", *paths, *ckpt, *FP32, "--format", "json", "-o", str(tmp_path / "classify.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "classify.jsonl").read_text().splitlines()]
    assert {r["input"]: r["labels"] for r in records} == expected
    for record, row in zip(records, eager):
        assert {p["label"]: p["probability"] for p in record["predictions"]} == pytest.approx(
            dict(zip(CLASSES, row.tolist())), abs=1e-5
        )

    # 3. evaluate on the validation labels file: the mAP and F1 that finetune recorded.
    capsys.readouterr()
    _run(["evaluate", str(data / "val.csv"), *ckpt, *FP32])
    scores = json.loads(capsys.readouterr().out)
    assert scores["evaluated"] == len(paths) and scores["multi_label"]
    assert scores["map"] == pytest.approx(metrics["val_map"], abs=1e-3)
    assert scores["f1"] == pytest.approx(metrics["val_f1"], abs=1e-3)

    # 4. predict (CSV): the same labels, one above_threshold flag per label.
    _run(["predict", *paths, *ckpt, *FP32, "--workers", "0", "-o", str(tmp_path / "p.csv")])
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(paths)
    flagged = {
        path: sorted(r["label"] for r in rows if r["input"] == path and r["above_threshold"] == "1") for path in paths
    }
    assert flagged == expected

    # 5. export: ONNX's probabilities are the sigmoid, and ONNX and TorchScript name the labels and thresholds.
    exports = tmp_path / "exports"
    _run(["export", *ckpt, "--format", "onnx", "-o", str(exports / "model.onnx")])
    _run(["export", *ckpt, "--format", "torchscript", "-o", str(exports / "model.pt")])
    session = onnxruntime.InferenceSession(str(exports / "model.onnx"))
    assert np.allclose(session.run(["probabilities"], {"input": batch.numpy()})[0], eager, atol=1e-5)
    carried = session.get_modelmeta().custom_metadata_map
    assert json.loads(carried["classes"]) == list(CLASSES) and carried["multi_label"] == "true"
    assert json.loads(carried["thresholds"]) == list(model.thresholds)
    extra = {TORCHSCRIPT_FILE: ""}
    torch.jit.load(str(exports / "model.pt"), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_FILE]) == {
        "classes": list(CLASSES),
        "multi_label": True,
        "thresholds": list(model.thresholds),
    }
    _run(["export", *ckpt, "--format", "triton", "-o", str(exports / "triton")])
    for folder in (exports / "triton").glob("*postprocess"):
        assert json.loads((folder / "1" / THRESHOLDS_FILE).read_text()) == list(model.thresholds)
    assert "above_threshold" in (exports / "triton" / ARCH / "config.pbtxt").read_text()

    # 6. serve: image bytes in; every label's sigmoid probability and its above_threshold flag out.
    server = ServeProcess(ARCH, best, tmp_path / "serve.log", top_k=1)
    try:
        client = httpclient.InferenceServerClient(server.url)
        image = httpclient.InferInput(contract.IMAGE, [len(paths[:4]), 1], "BYTES")
        image.set_data_from_numpy(np.array([[Path(path).read_bytes()] for path in paths[:4]], dtype=object))
        answer = client.infer(f"{ARCH}_image", [image])
        client.close()
    finally:
        assert server.stop() == 0
    labels, above = answer.as_numpy(contract.LABELS), answer.as_numpy(contract.ABOVE_THRESHOLD)
    assert labels.shape == (4, 3)  # every label, whatever --top-k
    served = [sorted(n.decode() for n, a in zip(row, flags) if a) for row, flags in zip(labels, above)]
    assert served == [expected[path] for path in paths[:4]]

    # 7. the web demo: every label's sigmoid probability, and the card says multi-label.
    from space import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # the demo reads uploads from there only
    demo = app.Demo(checkpoint=best, precision="fp32")
    _, shown, card, _ = demo.classify_upload(demo.default_model, uploaded(Path(paths[0])))
    assert shown == pytest.approx(dict(zip(CLASSES, eager[0].tolist())), abs=1e-5)
    assert "Multi-label" in card
