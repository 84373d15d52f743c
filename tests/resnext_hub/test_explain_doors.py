"""Explanation maps through the engine and ``classify --explain``: one overlay per input, named after it (the doors)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import IMAGES
from PIL import Image
from torch import nn

from resnext_hub import exit_codes
from resnext_hub.cli import main
from resnext_hub.engine import Engine
from resnext_hub.models import HeadError, build_model
from resnext_hub.options import InferenceOptions
from resnext_hub.outputs import picture_names

ARCH = "seresnext26d_32x4d"


def test_pictures_are_named_after_their_inputs_and_never_collide():
    items = ["a/cat.jpg", "b/cat.jpg", "b/CAT.png", "https://x.org/img/dog.jpeg?size=2", "https://x.org/", b"\xff\xd8",
             "odd name;\nwith\x07 bytes\udcff.jpg", ".hidden", "café.webp"]  # fmt: skip
    assert picture_names(items) == [
        "cat.png", "cat-2.png", "CAT-3.png", "dog.png", "x.org.png", "image.png",
        "odd_name__with__bytes.png", "hidden.png", "café.png",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, pretrained=False, num_classes=10).eval()


def test_the_engine_explains_on_its_fast_path_with_the_models_maps(model):
    engine = Engine(model, InferenceOptions(device="cpu", precision="fp32", workers=1))
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # preprocessed, small: cheap
    explained = engine.explain(batch)
    assert explained.maps.shape == (2, 2, 2) and explained.logits.shape == (2, 10)
    torch.testing.assert_close(explained.maps, model.explain(batch), rtol=0, atol=1e-4)
    torch.testing.assert_close(explained.logits, engine.logits(batch), rtol=0, atol=1e-5)
    assert engine.explain(batch, 3).classes.tolist() == [3, 3]
    assert explained.classes.dtype == torch.long and torch.equal(explained.classes, explained.logits.argmax(1))


def test_explained_items_come_in_order_with_their_photos_overlay_and_failures_without(model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>404</html>")
    engine = Engine(model, InferenceOptions(device="cpu", precision="fp32", workers=2, top_k=3))
    items = [str(broken), str(IMAGES / "camera.png"), (IMAGES / "chelsea.jpg").read_bytes()]
    explained = list(engine.explain_items(items, batch_size=2))
    assert [result.input for result, _ in explained] == items
    (failed, none), (camera, camera_overlay), (chelsea, chelsea_overlay) = explained
    assert failed.error and none is None
    assert camera.predictions == next(iter(engine.classify([items[1]], k=3))).predictions  # the same answer
    assert camera_overlay.size == (512, 512) and chelsea_overlay.size == Image.open(IMAGES / "chelsea.jpg").size


def test_an_engine_whose_head_is_not_linear_says_so(model):
    replaced = build_model(ARCH, pretrained=False, num_classes=10).eval()
    replaced.fc = nn.Sequential(nn.Linear(replaced.num_features, 32), nn.ReLU(), nn.Linear(32, 10))
    engine = Engine(replaced, InferenceOptions(device="cpu", precision="fp32", workers=1))
    with pytest.raises(HeadError, match="linear head"):
        engine.check_explainable()


@pytest.mark.slow  # the command in-process on a few photos (about 2 s of CPU)
def test_classify_explain_writes_one_overlay_per_input_at_its_aspect_ratio(small_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    shutil.copy(IMAGES / "chelsea.jpg", photos / "chelsea.jpg")
    shutil.copy(IMAGES / "coffee.jpg", photos / "more" / "chelsea.jpg")  # the same name in another folder
    shutil.copy(IMAGES / "camera.png", photos / "camera.png")
    (photos / "broken.jpg").write_bytes(b"<html>404</html>")
    out = tmp_path / "maps" / "deeper"
    argv = ["classify", str(photos), "--model", ARCH, "--checkpoint", str(small_checkpoint), "--explain", str(out)]
    status = main([*argv, "--format", "json", "--precision", "fp32", "--batch-size", "2"])
    assert status == exit_codes.SOME_FAILED  # broken.jpg
    assert sorted(p.name for p in out.iterdir()) == ["camera.png", "chelsea-2.png", "chelsea.png"]  # no temporary file
    for written, source in [("chelsea.png", photos / "chelsea.jpg"), ("chelsea-2.png", photos / "more" / "chelsea.jpg"),
                            ("camera.png", photos / "camera.png")]:  # fmt: skip
        picture, photo = Image.open(out / written), Image.open(source)
        assert picture.mode == "RGB" and picture.size == photo.size  # small photos decode at full size
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and sum('"error"' in line for line in lines) == 1


def test_classify_explain_into_a_file_is_refused_before_the_model_loads(tmp_path, torch_home, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    # No weights offline: had the model started loading, the status would say so (WEIGHTS_UNAVAILABLE).
    status = main(["classify", str(IMAGES / "chelsea.jpg"), "--model", ARCH, "--explain", str(taken)])
    assert status == exit_codes.USAGE
    assert f"error: --explain {taken} is a file: give a folder" in capsys.readouterr().err
    assert taken.read_text() == "a file"


@pytest.mark.slow  # quantizes the model (OpenVINO + NNCF, or torchao)
def test_an_int8_engine_says_it_cannot_explain_and_which_precisions_can(model):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    engine = Engine(model, InferenceOptions(device="cpu", precision="int8", calibration=[IMAGES / "chelsea.jpg"]))
    with pytest.raises(ValueError, match="the int8 copy of the model .* use precision fp32 or bf16"):
        engine.check_explainable()
