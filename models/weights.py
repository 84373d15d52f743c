"""Typed records of ``weights_manifest.json``: one :class:`Weights` per published checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..processing.labels import ClassList, class_list
from ..processing.presets import MANIFEST_PATH, ImageClassification, parse_presets

FORMAT_VERSION = 2
FILE_FORMATS = ("torch", "safetensors")
# The metric every record publishes: ImageNet-1k validation top-1/top-5 at 224x224.
IMAGENET_224 = "imagenet-1k@224"
# timm's scheme for a model on the Hugging Face Hub: ``timm.create_model("hf-hub:timm/<name>.<tag>")``.
HF_HUB_PREFIX = "hf-hub:"
# A source on the Hugging Face Hub: https://<hub host>/<org>/<repo>/resolve/<revision>/<file>
_HF_URL = re.compile(r"^https://huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class ManifestError(ValueError):
    """``weights_manifest.json`` does not have the documented shape."""


@dataclass(frozen=True)
class Source:
    """One place a checkpoint file can be fetched from."""

    url: str
    file_name: str
    file_format: str = "torch"
    sha256: str | None = None
    size_bytes: int | None = None

    @property
    def hf_location(self) -> tuple[str, str, str] | None:
        """(repo id, revision, file name in the repo) of a file on the Hugging Face Hub; None for other URLs."""
        found = _HF_URL.match(self.url)
        return (found.group(1), found.group(2), found.group(3)) if found else None


@dataclass(frozen=True)
class Weights:
    """A published checkpoint: where it is, how to check it, how to feed the model it fits."""

    name: str
    architecture: str
    default: bool
    publisher: str
    source: Source
    alternatives: tuple[Source, ...]
    integrity_note: str
    num_params: int
    classes: str
    num_classes: int
    preprocessing: ImageClassification
    test_preprocessing: ImageClassification | None
    metrics: dict[str, dict[str, Any]] = field(hash=False)
    license: str = ""
    provenance: str = ""

    @property
    def url(self) -> str:
        return self.source.url

    @property
    def file_name(self) -> str:
        return self.source.file_name

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source, *self.alternatives)

    @property
    def hf_hub_id(self) -> str | None:
        """The Hugging Face repo id (``"timm/<name>.<tag>"``) of the first source on the Hub; None without one."""
        return next((source.hf_location[0] for source in self.sources if source.hf_location), None)

    @property
    def class_list(self) -> ClassList:
        """The names of the classes these weights predict, by output index."""
        return class_list(self.classes)

    @property
    def accuracy(self) -> dict[str, Any]:
        """Published ImageNet-1k top-1/top-5 at 224 (``top1``, ``top5``, ``source``)."""
        return self.metrics[IMAGENET_224]


def _require(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in entry:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: expected {kind}, got {type(value).__name__} {value!r}")
    return value


def _preset(name: str, presets: dict[str, ImageClassification], where: str) -> ImageClassification:
    if name not in presets:
        raise ManifestError(f"{where}: expected one of the presets {sorted(presets)}, got {name!r}")
    return presets[name]


def _source(entry: dict[str, Any], where: str) -> Source:
    file_format = entry.get("file_format", "torch")
    if file_format not in FILE_FORMATS:
        raise ManifestError(f"{where}.file_format: expected one of {FILE_FORMATS}, got {file_format!r}")
    sha256 = entry.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64):
        raise ManifestError(f"{where}.sha256: expected 64 hex digits or null, got {sha256!r}")
    return Source(
        url=_require(entry, "url", str, where),
        file_name=_require(entry, "file_name", str, where),
        file_format=file_format,
        sha256=sha256,
        size_bytes=entry.get("size_bytes"),
    )


def parse_manifest(data: dict[str, Any]) -> dict[str, Weights]:
    """Validate a manifest's JSON and return its records by name (``<architecture>.<tag>``)."""
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"format_version: expected {FORMAT_VERSION}, got {data.get('format_version')!r}")
    try:
        presets = parse_presets(data.get("presets"))
    except ValueError as error:
        raise ManifestError(str(error)) from None
    records = {}
    for name, entry in _require(data, "weights", dict, "manifest").items():
        where = f"weights[{name!r}]"
        architecture = _require(entry, "architecture", str, where)
        if not name.startswith(architecture + "."):
            raise ManifestError(f"{where}: name must be '<architecture>.<tag>' with architecture {architecture!r}")
        classes_name = _require(entry, "classes", str, where)
        try:
            classes = class_list(classes_name)
        except ValueError as error:
            raise ManifestError(f"{where}.classes: {error}") from None
        num_classes = _require(entry, "num_classes", int, where)
        if num_classes != len(classes):
            raise ManifestError(f"{where}.num_classes: {num_classes}, but {classes_name!r} has {len(classes)} classes")
        test = entry.get("test_preprocessing")
        metrics = _require(entry, "metrics", dict, where)
        if not isinstance(metrics.get(IMAGENET_224), dict):
            raise ManifestError(f"{where}.metrics: missing {IMAGENET_224!r} (top1, top5, source)")
        if entry.get("sha256") is None and not entry.get("integrity_note"):
            raise ManifestError(f"{where}: sha256 is null, so integrity_note must say why")
        records[name] = Weights(
            name=name,
            architecture=architecture,
            default=bool(entry.get("default", False)),
            publisher=_require(entry, "publisher", str, where),
            source=_source(entry, where),
            alternatives=tuple(_source(alt, f"{where}.alternatives") for alt in entry.get("alternatives", [])),
            integrity_note=entry.get("integrity_note", ""),
            num_params=_require(entry, "num_params", int, where),
            classes=classes_name,
            num_classes=num_classes,
            preprocessing=_preset(_require(entry, "preprocessing", str, where), presets, f"{where}.preprocessing"),
            test_preprocessing=_preset(test, presets, f"{where}.test_preprocessing") if test is not None else None,
            metrics=metrics,
            license=_require(entry, "license", str, where),
            provenance=_require(entry, "provenance", str, where),
        )
    defaults = [r.architecture for r in records.values() if r.default]
    duplicated = sorted({a for a in defaults if defaults.count(a) > 1})
    if duplicated:
        raise ManifestError(f"more than one default weights for {duplicated}")
    return records


@cache
def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, Weights]:
    """All records of the manifest at ``path`` (read once per process)."""
    with open(path, encoding="utf-8") as handle:
        return parse_manifest(json.load(handle))


def weights_for(architecture: str) -> list[Weights]:
    """Records for ``architecture``, default first."""
    found = [w for w in load_manifest().values() if w.architecture == architecture]
    return sorted(found, key=lambda w: not w.default)


def hf_hub_ids() -> list[str]:
    """Every ``hf-hub:<repo id>`` that names a record (weights with a source on the Hugging Face Hub)."""
    return sorted(HF_HUB_PREFIX + w.hf_hub_id for w in load_manifest().values() if w.hf_hub_id)


def weights_for_hf_hub_id(model_id: str) -> Weights:
    """The record that ``hf-hub:<org>/<name>.<tag>`` (timm's spelling) names; ``ValueError`` listing the ids served."""
    repo_id = model_id[len(HF_HUB_PREFIX) :] if model_id.startswith(HF_HUB_PREFIX) else model_id
    for record in load_manifest().values():
        if record.hf_hub_id is not None and record.hf_hub_id == repo_id:
            return record
    raise ValueError(
        f"unknown Hugging Face model id {model_id!r}: these weights are not in {MANIFEST_PATH.name}. "
        f"Expected one of {hf_hub_ids()} (or an entry point / architecture name)"
    )


def get_weights(architecture: str, weights: str | Weights | None = None) -> Weights:
    """Resolve a weights argument: ``None`` (the default), a tag, a full name, an ``hf-hub:`` id, or a record."""
    available = weights_for(architecture)
    if isinstance(weights, Weights):
        if weights.architecture != architecture:
            raise ValueError(f"weights {weights.name!r} are for {weights.architecture!r}, not {architecture!r}")
        return weights
    if not isinstance(weights, (str, type(None))):
        raise TypeError(f"weights must be None, a tag, a name or a Weights record; got {type(weights).__name__}")
    if not available:
        raise ValueError(f"no published weights for {architecture!r} in {MANIFEST_PATH.name}")
    if weights is None:
        return available[0]
    if weights.startswith(HF_HUB_PREFIX):
        record = weights_for_hf_hub_id(weights)
        if record.architecture != architecture:
            raise ValueError(f"weights {weights!r} are for {record.architecture!r}, not {architecture!r}")
        return record
    for record in available:
        if weights in (record.name, record.name.split(".", 1)[1]):
            return record
    names = [r.name for r in available]
    raise ValueError(f"unknown weights {weights!r} for {architecture!r}; expected one of {names}")
