"""The web demo serves a saved OpenVINO IR (``export --format openvino``) with its own classes, as the CLI does.

This file loads OpenVINO: the Makefile runs it in the pytest process of its own that the other OpenVINO tests
get (OpenVINO's thread pool crashed a later fork()).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import IMAGES, uploaded

from resnext_hub.engine import Engine
from resnext_hub.export.openvino_ir import export_openvino
from resnext_hub.models import build_model
from resnext_hub.models.openvino_ir import load_openvino_ir
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import load_image

pytest.importorskip("openvino", reason="needs openvino ([int8] extra)")

ARCH = "seresnext26d_32x4d"
pytestmark = pytest.mark.slow  # an IR export (seconds) and the app


@pytest.fixture(scope="module")
def ir_folder(small_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ir") / "model"
    export_openvino(build_model(ARCH, pretrained_from_file=small_checkpoint), folder, image_size=64)
    return folder


def test_the_demo_serves_a_saved_ir_with_its_classes_and_says_so(ir_folder, tmp_path, monkeypatch):
    from space import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # the demo reads uploads from there only
    photo = IMAGES / "chelsea.jpg"

    demo = app.Demo(checkpoint=ir_folder, precision="fp32")  # the IR runs as saved, whatever the demo's precision
    assert demo.entries == [ARCH]  # the architecture is read from the IR's metadata, nothing compiled for it
    _, top5, card, overlay = demo.classify_upload(demo.default_model, uploaded(photo))
    assert "a saved OpenVINO IR in fp32" in card and "OpenVINO, fp32 as saved, on cpu" in card
    assert overlay is None  # an IR gives out no feature maps: the top-5 without a heatmap
    # The same answer as the IR loaded by the CLI's path.
    engine = Engine(load_openvino_ir(ir_folder), InferenceOptions(device="cpu"))
    image = engine.preprocessing(load_image(photo))
    expected = engine.top_k(image[None], 5)[0]
    assert list(top5) == [p.label for p in expected]
    assert list(top5.values()) == pytest.approx([p.probability for p in expected], abs=1e-5)


def test_an_ir_for_another_architecture_is_refused_before_anything_loads(ir_folder):
    from space import app

    with pytest.raises(SystemExit, match="seresnext26d_32x4d, not seresnext50_32x4d"):
        app.checkpoint_entry(ir_folder, "seresnext50_32x4d")
