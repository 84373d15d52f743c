"""The demo's request handlers in-process: limits, loading states and messages, and the Space bundle."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import uploaded

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "space"
IMAGES = ROOT / "assets" / "images"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The ``app`` module with a mirror holding seresnext26d and 26t (random weights), fp32."""
    from safetensors.torch import save_file

    from tools.fake_checkpoints import random_state_dict

    mirror = tmp_path_factory.mktemp("mirror")
    for name in ("seresnext26d_32x4d", "seresnext26t_32x4d"):
        state = random_state_dict(name)
        save_file({k: v.contiguous() for k, v in state.items()}, mirror / f"{name}.bt_in1k.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESNEXT_HUB_WEIGHTS_MIRROR", str(mirror))
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        patch.setenv("RESNEXT_HUB_SPACE_PRECISION", "fp32")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("uploads")))  # where the demo reads uploads
        from space import app

        yield app


@pytest.fixture(scope="module")
def demo(app):
    return app.Demo(default_model="seresnext26d_32x4d")


def _message(excinfo) -> str:
    return excinfo.value.message


@pytest.mark.slow
def test_every_model_entry_point_is_offered_once(demo) -> None:
    assert demo.entries == [
        "nvidia_resnext101_32x4d",
        "nvidia_se_resnext101_32x4d",
        "seresnext26d_32x4d",
        "seresnext26t_32x4d",
        "seresnext50_32x4d",
    ]


def test_an_upload_gives_a_photo_a_top5_the_card_and_the_explanation(demo) -> None:
    photo, top5, card, explained = demo.classify_upload("seresnext26d_32x4d", {"path": str(IMAGES / "camera.png")})
    assert max(photo.size) <= 512 and photo.mode == "RGB"
    assert explained.size == photo.size and explained.mode == "RGB"  # the overlay, at the photo's shape
    assert len(top5) == 5 and all(0 < p < 1 for p in top5.values())
    assert list(top5.values()) == sorted(top5.values(), reverse=True)
    assert "16,809,512 parameters" in card


def test_a_large_upload_decodes_at_the_size_the_model_needs(demo, app, tmp_path) -> None:
    from resnext_hub.processing import load_image
    from tools.camera_photos import camera_photo

    path = tmp_path / "large.jpg"
    path.write_bytes(camera_photo(1, (1400, 1050)))  # over four times the preset's 256: decoded at half size
    _, top5, _, _ = demo.classify_upload("seresnext26d_32x4d", uploaded(path))
    engine = demo._served("seresnext26d_32x4d").engine
    (result,) = engine.classify([str(path)], batch_size=1)  # the engine's own decode, at decode_size
    assert top5 == app.top5_dict(result.predictions)
    full = engine.top_k(engine.preprocessing(load_image(path))[None], 5)[0]
    assert top5 != app.top5_dict(full)  # the full decode would have given other figures


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: d.classify_upload("seresnext26d_32x4d", None), "Upload or paste a photo first"),
        (lambda d: d.classify_url("seresnext26d_32x4d", "  "), "Paste the address of an image"),
        (lambda d: d.classify_upload("nvidia_convnets_processing_utils", {"path": "x"}), "Pick one of the listed"),
        (lambda d: d.classify_url("seresnext26d_32x4d", "http://[::1]:8080/a.jpg"), "::1 is a local"),
        (lambda d: d.classify_url("seresnext26d_32x4d", "file:///etc/passwd"), "only http:// and https://"),
        (lambda d: d.classify_upload("seresnext26d_32x4d", uploaded(ROOT / "README.md")), "not a usable image"),
        # A server file that was never uploaded (here a real photo): the app reads uploads and samples only.
        (
            lambda d: d.classify_upload("seresnext26d_32x4d", {"path": str(ROOT / "docs" / "space-demo.png")}),
            "was not uploaded",
        ),
        (lambda d: d.classify_upload("seresnext26d_32x4d", {"path": "/etc/hostname"}), "was not uploaded"),
    ],
)
def test_bad_requests_get_a_short_message(demo, app, call, message: str) -> None:
    with pytest.raises(app.gr.Error) as excinfo:
        call(demo)
    assert message in _message(excinfo)
    assert "Traceback" not in _message(excinfo) and len(_message(excinfo)) <= 200


def test_a_url_gives_the_same_answer_as_the_upload(demo, monkeypatch) -> None:
    import ipaddress

    from servers import FileServer

    # The app's own policy refuses 127.0.0.1; here it may reach the test server and nothing else.
    monkeypatch.setattr(demo, "url_policy", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
    with FileServer(IMAGES) as server:
        _, from_url, _, _ = demo.classify_url("seresnext26d_32x4d", f"{server.url}/chelsea.jpg")
    _, from_upload, _, _ = demo.classify_upload("seresnext26d_32x4d", {"path": str(IMAGES / "chelsea.jpg")})
    assert from_url == from_upload and server.requests["/chelsea.jpg"] == 1


def test_a_slow_request_is_stopped_at_the_time_limit(demo, app, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setattr(app, "REQUEST_TIME_LIMIT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(app.gr.Error) as excinfo:
        demo._classify("seresnext26d_32x4d", lambda min_size: time.sleep(3) or Image.new("RGB", (64, 64)))
    assert "took over 0.5 s" in _message(excinfo)
    assert time.monotonic() - started < 2.5


def test_a_loading_model_says_so_then_serves(demo, app, monkeypatch) -> None:
    monkeypatch.setattr(app, "MODEL_WAIT_S", 0.0)
    with pytest.raises(app.gr.Error) as excinfo:
        demo.describe("seresnext26t_32x4d")
    assert "still loading" in _message(excinfo)
    monkeypatch.setattr(app, "MODEL_WAIT_S", 120.0)
    assert "16,806,976 parameters" in demo.describe("seresnext26t_32x4d")


def test_a_model_without_weights_is_reported_not_raised(demo, app) -> None:
    with pytest.raises(app.gr.Error) as excinfo:
        demo.describe("seresnext50_32x4d")  # not in the mirror
    assert "could not be loaded on this server" in _message(excinfo)


def test_duplicate_imagenet_names_stay_distinct(app) -> None:
    from resnext_hub.processing import Prediction

    ranked = [Prediction(134, None, "crane", 0.5), Prediction(517, None, "crane", 0.3)]
    assert app.top5_dict(ranked) == {"crane": 0.5, "crane (#517)": 0.3}


@pytest.mark.slow
def test_the_space_bundle_runs_the_same_app(tmp_path) -> None:
    dest = tmp_path / "space"
    subprocess.run([sys.executable, str(SPACE / "bundle.py"), str(dest)], check=True, capture_output=True)
    space_files = ("app.py", "space/app.py", "space/server.py", "space/serving.py", "requirements.txt")
    for name in (*space_files, "hubconf.py", "weights_manifest.json"):
        assert (dest / name).is_file(), name
    assert (dest / "assets" / "images" / "chelsea.jpg").is_file()
    assert not list(dest.rglob("__pycache__"))
    # The Space's root app.py runs the space package's app (here only as far as its --help).
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['app.py', '--help']\n"
        "try:\n    runpy.run_path('app.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "from resnext_hub.models import list_models\n"
        "from space import app\n"
        "print(app.REPO); print(len(app.sample_photos())); print(list_models())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=dest, capture_output=True, text=True, timeout=120, check=True
    )
    assert "resnext-hub web demo" in result.stdout  # the --help of space.app
    repo, samples, entries = result.stdout.strip().splitlines()[-3:]
    assert Path(repo) == dest.resolve() and samples == "5" and "nvidia_se_resnext101_32x4d" in entries


def test_the_space_requirements_match_the_repo() -> None:
    space = (SPACE / "requirements.txt").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text()
    front_matter = (SPACE / "README.md").read_text().split("---")[1]
    pin = next(line for line in space.splitlines() if line.startswith("gradio=="))
    assert pin in dev.splitlines()
    assert f"sdk_version: {pin.split('==')[1]}" in front_matter
    names = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in space.splitlines()}
    for needed in ("torch", "torchvision", "pillow", "numpy", "requests", "safetensors", "tqdm"):
        assert needed in names, needed


def test_a_photo_that_raises_anything_gets_its_own_message_and_the_next_one_is_served(demo, app, tmp_path) -> None:
    from PIL import Image

    # A photo whose preprocessing raises.
    served = demo.models.get("seresnext26d_32x4d", 120)
    preprocess = served.engine.preprocessing

    def faulty(image):
        if image.size == (37, 23):
            raise ZeroDivisionError("division by zero")
        return preprocess(image)

    Image.new("RGB", (37, 23), "blue").save(tmp_path / "odd.png")
    served.engine.preprocessing = faulty
    try:
        with pytest.raises(app.gr.Error) as excinfo:
            demo.classify_upload("seresnext26d_32x4d", uploaded(tmp_path / "odd.png"))
        assert _message(excinfo) == "That image could not be processed (ZeroDivisionError: division by zero)."
        assert excinfo.value.title == "Could not process the image"
        _, top5, _, _ = demo.classify_upload("seresnext26d_32x4d", {"path": str(IMAGES / "camera.png")})
        assert len(top5) == 5
    finally:
        served.engine.preprocessing = preprocess


# -- issue 19: a local checkpoint with its own classes ------------------------------------------------------------


def test_a_finetuned_checkpoint_is_served_with_its_own_labels(app, finetuned) -> None:
    demo = app.Demo(checkpoint=finetuned["checkpoint"])  # the architecture comes from the file
    assert demo.entries == [finetuned["architecture"]] and demo.default_model == finetuned["architecture"]
    photo = sorted((finetuned["data"] / "val" / "square").iterdir())[0]
    _, top5, card, _ = demo.classify_upload(demo.default_model, uploaded(photo))
    assert sorted(top5) == sorted(finetuned["classes"])  # 3 classes: all of them, by the user's names
    assert abs(sum(top5.values()) - 1) < 1e-5
    assert "local checkpoint `best.pth`, 3 classes: circle, square, triangle" in card
    assert "Published accuracy" not in card
    # The same answer as the library's: the checkpoint loaded through torch.hub, the same as everywhere.
    import torch

    from resnext_hub.processing import load_image

    model = torch.hub.load(
        str(ROOT), finetuned["architecture"], source="local", pretrained_from_file=str(finetuned["checkpoint"])
    )
    with torch.inference_mode():
        expected = model(model.preprocessing(load_image(photo))[None]).softmax(1)[0]
    for index, name in enumerate(model.classes.names):
        assert abs(top5[name] - expected[index].item()) < 1e-5


def test_a_checkpoint_the_demo_cannot_serve_stops_it_with_the_reason(
    app, finetuned, small_checkpoint, tmp_path
) -> None:
    for options, message in (
        ({"checkpoint": tmp_path / "missing.pth"}, "does not exist"),
        ({"checkpoint": small_checkpoint}, "does not say which architecture it holds: add --model NAME"),
        ({"checkpoint": finetuned["checkpoint"], "default_model": "seresnext50_32x4d"}, "was fine-tuned from"),
    ):
        with pytest.raises(SystemExit, match=message):
            app.Demo(**options)
    # A plain weights file with --model: that entry, with its weights.
    demo = app.Demo(checkpoint=small_checkpoint, default_model="seresnext26d_32x4d")
    assert demo.entries == ["seresnext26d_32x4d"]
    assert "local checkpoint `seresnext26d_32x4d.pth`, 1000 classes: tench, Tinca tinca" in demo.describe(
        "seresnext26d_32x4d"
    )
