"""weights_manifest.json is well-formed and agrees with the models it describes."""

from __future__ import annotations

import copy
import json
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pytest
import torch

from resnext_hub import models
from resnext_hub.models.weights import MANIFEST_PATH, ManifestError, Weights, get_weights, parse_manifest
from resnext_hub.processing import imagenet_labels

RECORDS = sorted(models.load_manifest().values(), key=lambda w: w.name)


def test_every_architecture_has_default_weights():
    assert {w.architecture for w in RECORDS if w.default} == set(models.VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("record", RECORDS, ids=lambda w: w.name)
def test_record_matches_model(record: Weights):
    with torch.device("meta"):
        model = models.ResNet(models.VARIANTS[record.architecture], record.num_classes)
    assert sum(p.numel() for p in model.parameters()) == record.num_params
    assert record.classes == "imagenet-1k" and record.num_classes == len(imagenet_labels()) == 1000
    for source in record.sources:
        assert PurePosixPath(urlparse(source.url).path).name in (source.file_name, "model.safetensors")
        assert urlparse(source.url).scheme == "https"
    if record.source.sha256 is None:
        assert "SHA-256" in record.integrity_note
    assert record.metrics["imagenet-1k@224"]["top1"] > 75 and record.metrics["imagenet-1k@224"]["source"]
    assert record.license and record.provenance
    assert record.preprocessing.crop_size == 224 and record.preprocessing.resize_size == 256


def test_nvidia_records_match_facts():
    se = get_weights("se_resnext101_32x4d")
    assert se.url.endswith(
        "/seresnext101_32x4d_pyt_amp/versions/20.06.0/files/nvidia_se-resnext101-32x4d_200821.pth.tar"
    )
    assert se.publisher == "NVIDIA NGC" and se.preprocessing.interpolation == "bilinear"
    assert get_weights("resnext101_32x4d", "ngc_20.06").metrics["imagenet-1k@224"]["top1"] == 79.47


def test_lookup_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown weights 'nope'.*se_resnext101_32x4d\.ngc_20\.06"):
        get_weights("se_resnext101_32x4d", "nope")
    with pytest.raises(ValueError, match="are for 'resnext101_32x4d'"):
        get_weights("se_resnext101_32x4d", get_weights("resnext101_32x4d"))


def _manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.update(format_version=1), "format_version"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].pop("url"), "missing field 'url'"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(publisher=None), "publisher"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(classes="coco"), "unknown class list"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(num_classes=10), "num_classes"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(preprocessing="nope"), "presets"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(integrity_note=""), "integrity_note"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(num_params="45M"), "num_params"),
        (lambda m: m["weights"]["se_resnext101_32x4d.ngc_20.06"].update(sha256="abc"), "64 hex digits"),
        (
            lambda m: m["presets"]["nvidia"].update(interpolation="lanczos"),
            "interpolation",
        ),
    ],
)
def test_malformed_manifest_is_refused(mutate, message):
    manifest = copy.deepcopy(_manifest())
    mutate(manifest)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(manifest)
