"""One fine-tuned checkpoint through every door, as a user walks it (README, "Your own classes, everywhere").

``finetune`` on a folder of three shapes, then the same ``best.pth`` through ``evaluate``, ``classify``,
``predict``, every ``export`` format (ONNX, TorchScript, pt2, a Triton repository), ``serve`` (image bytes in,
the user's labels out), ``torch.hub.load`` and the web demo. Every door must answer with the user's class
names, and the doors that rank must agree with each other on every image (exact fp32 everywhere).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.http as httpclient
from conftest import ROOT, uploaded
from triton_servers import ServeProcess

from resnext_hub import cli
from resnext_hub.processing import load_image
from resnext_hub.triton import contract
from tools.shapes_dataset import CLASSES, write_shapes_dataset

pytestmark = pytest.mark.slow  # trains, compiles a pt2 package and starts a Triton server

ARCH = "seresnext26d_32x4d"
FP32 = ["--precision", "fp32"]


def _run(argv: list[str]) -> None:
    assert cli.main([*argv, "--no-progress"] if argv[0] in ("finetune", "evaluate", "predict") else argv) == 0, argv


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_finetuned_checkpoint_works_through_every_door(tmp_path, capsys, monkeypatch):
    data = write_shapes_dataset(tmp_path / "shapes", train=8, val=4, size=40, seed=3, colour_coded=True)
    out = tmp_path / "run"
    # 1. finetune: a model of the user's three classes.
    train = [
        "--model",
        ARCH,
        "--no-pretrained",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "-o",
        str(out),
    ]
    _run(["finetune", str(data), *train])
    best = out / "best.pth"
    ckpt = ["--model", ARCH, "--checkpoint", str(best)]
    val = data / "val"
    capsys.readouterr()

    # 2. classify: every record names one of the user's classes.
    _run(["classify", str(val), *ckpt, *FP32, "--format", "json", "-o", str(tmp_path / "classify.jsonl")])
    classified = {r["input"]: r["predictions"][0]["label"] for r in _jsonl(tmp_path / "classify.jsonl")}
    assert len(classified) == 3 * 4 and set(classified.values()) <= set(CLASSES)
    top1 = 100 * sum(Path(path).parent.name == label for path, label in classified.items()) / len(classified)

    # 3. evaluate on the folder it was trained from: its top-1 is classify's.
    capsys.readouterr()
    _run(["evaluate", str(val), *ckpt, *FP32])
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluated"] == 12 and summary["top1"] == pytest.approx(top1)

    # 4. predict: the same top-1 per input, the user's labels.
    _run(["predict", str(val), *ckpt, *FP32, "--top-k", "2", "--workers", "0", "-o", str(tmp_path / "p.jsonl")])
    predicted = {r["input"]: [p["label"] for p in r["predictions"]] for r in _jsonl(tmp_path / "p.jsonl")}
    assert {path: labels[0] for path, labels in predicted.items()} == classified

    # The hub door: the same checkpoint through torch.hub, with the user's names and preprocessing.
    model = torch.hub.load(str(ROOT), ARCH, source="local", pretrained_from_file=str(best))
    assert model.classes.names == tuple(CLASSES) and model.num_classes == 3
    paths = sorted(classified)
    batch = torch.stack([model.preprocessing(load_image(path)) for path in paths])
    with torch.inference_mode():
        eager = model(batch).numpy()
    assert [CLASSES[i] for i in eager.argmax(1)] == [classified[path] for path in paths]

    # 5. export, every format: each file computes the same classes.
    exports = tmp_path / "exports"
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt"), ("pt2", "model.pt2")):
        _run(["export", *ckpt, "--format", fmt, "-o", str(exports / name)])
    onnx_logits = onnxruntime.InferenceSession(str(exports / "model.onnx")).run(None, {"input": batch.numpy()})[0]
    assert (onnx_logits.argmax(1) == eager.argmax(1)).all()
    with zipfile.ZipFile(exports / "model.pt2") as package:  # pt2 carries the user's classes too
        assert json.loads(package.read("archive/extra/labels.json"))["classes"] == list(CLASSES)
    scripted = torch.jit.load(str(exports / "model.pt"))
    with torch.inference_mode():
        assert (scripted(batch).argmax(1).numpy() == eager.argmax(1)).all()
    _run(["export", *ckpt, "--format", "triton", "--top-k", "3", "-o", str(exports / "triton")])
    labels_files = sorted((exports / "triton").glob("*/1/labels.json"))
    assert labels_files and all(json.loads(f.read_text(encoding="utf-8")) == list(CLASSES) for f in labels_files)

    # 6. serve: image bytes in, the user's labels out (top-1 as classify's), in batched requests.
    server = ServeProcess(ARCH, best, tmp_path / "serve.log", top_k=3)
    served, errors = [], []
    try:
        client = httpclient.InferenceServerClient(server.url)
        for start in range(0, len(paths), 4):  # the server's largest batch is 8
            chunk = paths[start : start + 4]
            image = httpclient.InferInput(contract.IMAGE, [len(chunk), 1], "BYTES")
            image.set_data_from_numpy(np.array([[Path(path).read_bytes()] for path in chunk], dtype=object))
            answer = client.infer(f"{ARCH}_image", [image])
            served += [row[0].decode() for row in answer.as_numpy(contract.LABELS)]
            errors += answer.as_numpy(contract.ERROR)[:, 0].tolist()
        client.close()
    finally:
        assert server.stop() == 0
    assert served == [classified[path] for path in paths] and errors == [b""] * len(paths)

    # 7. the web demo: the checkpoint's own classes in its top-5, and the same top-1.
    from space import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # the demo reads uploads from there only
    demo = app.Demo(checkpoint=best, precision="fp32")
    _, top5, card, _ = demo.classify_upload(demo.default_model, uploaded(Path(paths[0])))
    assert sorted(top5) == sorted(CLASSES) and max(top5, key=top5.get) == classified[paths[0]]
    assert "3 classes" in card
