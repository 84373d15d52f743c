"""NVIDIA's processing calls give NVIDIA's results on the shared photos; helpers for programs."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch
from conftest import IMAGES, RGB_PHOTOS
from PIL import Image
from servers import FileServer
from torchvision import transforms

from resnext_hub import processing


def nvidia_prepare(path) -> torch.Tensor:
    """NVIDIA's published prepare_input_from_uri, for a local RGB file (reference)."""
    img = Image.open(path)
    img = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(img)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return img.float().unsqueeze(0).sub_(mean).div_(std)


@pytest.mark.parametrize("photo", RGB_PHOTOS, ids=lambda p: p.name)
def test_prepare_input_matches_nvidia_for_paths_and_urls(photo):
    expected = nvidia_prepare(photo)
    assert expected.shape == (1, 3, 224, 224)
    from_path = processing.prepare_input_from_uri(str(photo))
    assert torch.equal(from_path, expected)  # bit for bit: the compatibility promise
    with FileServer(IMAGES) as server:
        from_url = processing.prepare_input_from_uri(f"{server.url}/{photo.name}")
        assert server.requests[f"/{photo.name}"] == 1
    assert torch.equal(from_url, from_path)


def test_grayscale_photo_becomes_rgb():
    gray = IMAGES / "camera.png"
    assert Image.open(gray).mode == "L"
    tensor = processing.prepare_input_from_uri(gray)
    assert tensor.shape == (1, 3, 224, 224) and torch.isfinite(tensor).all()
    # The three channels carry the same gray values, normalized per channel.
    unnormalized = (
        tensor[0] * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    )
    assert (unnormalized[0] - unnormalized[2]).abs().max() < 1e-5


def test_cuda_flag_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        assert processing.prepare_input_from_uri(RGB_PHOTOS[0], cuda=True).is_cuda
    else:
        with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda|nvidia"):
            processing.prepare_input_from_uri(RGB_PHOTOS[0], cuda=True)


def nvidia_pick_n_best(predictions, n, classes):
    """NVIDIA's published pick_n_best (reference), with the shipped class names."""
    predictions = predictions.float().cpu().numpy()
    top_n = np.argsort(-1 * predictions, axis=-1)[:, :n]
    results = []
    for idx, case in enumerate(top_n):
        r = [(str(classes[i]), f"{100 * float(predictions[idx, i]):.1f}%") for i in case]
        results.append(r)
        print(f"sample {idx}: {r}")
    return results


def test_pick_n_best_matches_nvidia(capsys):
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(3, 1000) * 4, dim=1)
    classes = processing.get_imgnet_classes()
    expected = nvidia_pick_n_best(probabilities, 5, classes)
    expected_out = capsys.readouterr().out
    got = processing.pick_n_best(predictions=probabilities, n=5)
    assert got == expected and capsys.readouterr().out == expected_out
    lines = expected_out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("sample 0: [(")
    pairs = ast.literal_eval(lines[1].split(": ", 1)[1])
    assert all(isinstance(name, str) and pct.endswith("%") for name, pct in pairs)


def test_imagenet_classes_are_shipped_and_never_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    classes = processing.get_imgnet_classes()
    assert isinstance(classes, np.ndarray) and classes.shape == (1000,)
    assert classes[0] == "tench, Tinca tinca"
    assert classes[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert processing.imagenet_wnids()[0] == "n01440764"
    assert os.listdir(tmp_path) == []


def test_top_k_records():
    logits = torch.full((2, 1000), -10.0)
    logits[0, 281], logits[1, 967] = 10.0, 10.0
    ranked = processing.top_k(logits, k=3, logits=True)
    best = ranked[0][0]
    assert best.index == 281 and best.wnid == "n02123045" and best.label.startswith("tabby")
    assert best.probability == pytest.approx(1.0, abs=1e-5)
    assert ranked[1][0].label == "espresso" and len(ranked[1]) == 3
    custom = processing.top_k(torch.tensor([[0.2, 0.8]]), k=5, labels=["cat", "dog"])
    assert custom == [
        [
            processing.Prediction(1, None, "dog", pytest.approx(0.8)),
            processing.Prediction(0, None, "cat", pytest.approx(0.2)),
        ]
    ]
    with pytest.raises(ValueError, match="2 classes in the scores but 3 labels"):
        processing.top_k(torch.tensor([[0.2, 0.8]]), labels=["a", "b", "c"])


@pytest.mark.slow
def test_prepare_batch_mixes_sources_and_matches_single_calls():
    photo = RGB_PHOTOS[0]
    pil = Image.open(photo)
    batch = processing.prepare_batch([str(photo), photo.read_bytes(), pil], channels_last=True)
    assert batch.shape == (3, 3, 224, 224) and batch.is_contiguous(memory_format=torch.channels_last)
    single = processing.prepare_input_from_uri(photo)
    for row in batch:
        assert torch.equal(row, single[0])
    with pytest.raises(ValueError, match="at least one image"):
        processing.prepare_batch([])


def test_preprocessing_follows_the_model_record():
    spec = {"resize_size": 320, "crop_size": 288, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    utils = processing.nvidia_convnets_processing_utils(preprocessing=processing.ImageClassification.from_dict(spec))
    assert utils.prepare_input_from_uri(RGB_PHOTOS[0]).shape == (1, 3, 288, 288)
    default = processing.nvidia_convnets_processing_utils()
    assert default.prepare_input_from_uri(RGB_PHOTOS[0]).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        processing.ImageClassification.from_dict({**spec, "interpolation": "lanczos"})


def test_bad_uri_is_a_value_error_naming_it(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(processing.InvalidImageError, match="nope.jpg: no such file") as error:
        processing.prepare_input_from_uri(str(missing))
    assert isinstance(error.value, ValueError)
