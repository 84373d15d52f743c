"""Typed records of ``weights_manifest.json``: one :class:`Weights` per published checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

MANIFEST_PATH = Path(__file__).resolve().parent.parent / "weights_manifest.json"
KEY_LAYOUTS = ("nvidia", "timm")
FILE_FORMATS = ("torch", "safetensors")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class ManifestError(ValueError):
    """``weights_manifest.json`` does not have the documented shape."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``, normalize."""

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class Source:
    """One place a checkpoint file can be fetched from."""

    url: str
    file_name: str
    file_format: str = "torch"
    sha256: str | None = None
    size_bytes: int | None = None


@dataclass(frozen=True)
class Weights:
    """A published checkpoint: where it is, how to check it, how to feed the model it fits."""

    name: str
    architecture: str
    default: bool
    source: Source
    alternatives: tuple[Source, ...]
    integrity_note: str
    num_params: int
    key_layout: str
    classes: str
    num_classes: int
    preprocessing: Preprocessing
    test_preprocessing: Preprocessing | None
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


def _require(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in entry:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: expected {kind}, got {type(value).__name__} {value!r}")
    return value


def _preprocessing(entry: dict[str, Any], where: str) -> Preprocessing:
    interpolation = _require(entry, "interpolation", str, where)
    if interpolation not in INTERPOLATIONS:
        raise ManifestError(f"{where}.interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}")
    mean, std = (tuple(float(v) for v in _require(entry, key, list, where)) for key in ("mean", "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ManifestError(f"{where}: mean and std need 3 values each (std > 0), got {mean} and {std}")
    return Preprocessing(
        resize_size=_require(entry, "resize_size", int, where),
        crop_size=_require(entry, "crop_size", int, where),
        interpolation=interpolation,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


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
    if data.get("format_version") != 1:
        raise ManifestError(f"format_version: expected 1, got {data.get('format_version')!r}")
    records = {}
    for name, entry in _require(data, "weights", dict, "manifest").items():
        where = f"weights[{name!r}]"
        architecture = _require(entry, "architecture", str, where)
        if not name.startswith(architecture + "."):
            raise ManifestError(f"{where}: name must be '<architecture>.<tag>' with architecture {architecture!r}")
        key_layout = _require(entry, "key_layout", str, where)
        if key_layout not in KEY_LAYOUTS:
            raise ManifestError(f"{where}.key_layout: expected one of {KEY_LAYOUTS}, got {key_layout!r}")
        if entry.get("sha256") is None and not entry.get("integrity_note"):
            raise ManifestError(f"{where}: sha256 is null, so integrity_note must say why")
        test_pre = entry.get("test_preprocessing")
        records[name] = Weights(
            name=name,
            architecture=architecture,
            default=bool(entry.get("default", False)),
            source=_source(entry, where),
            alternatives=tuple(_source(alt, f"{where}.alternatives") for alt in entry.get("alternatives", [])),
            integrity_note=entry.get("integrity_note", ""),
            num_params=_require(entry, "num_params", int, where),
            key_layout=key_layout,
            classes=_require(entry, "classes", str, where),
            num_classes=_require(entry, "num_classes", int, where),
            preprocessing=_preprocessing(_require(entry, "preprocessing", dict, where), f"{where}.preprocessing"),
            test_preprocessing=_preprocessing(test_pre, f"{where}.test_preprocessing") if test_pre else None,
            metrics=_require(entry, "metrics", dict, where),
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


def get_weights(architecture: str, weights: str | Weights | None = None) -> Weights:
    """Resolve a weights argument: ``None`` (the default), a tag, a full name, or a record."""
    available = weights_for(architecture)
    if isinstance(weights, Weights):
        if weights.architecture != architecture:
            raise ValueError(f"weights {weights.name!r} are for {weights.architecture!r}, not {architecture!r}")
        return weights
    if not isinstance(weights, (str, type(None))):
        # Any manifest record, also one from the other import of this package (torch.hub's
        # ``resnext_hub.models`` vs a program's top-level ``models``): look it up by name.
        name, owner = getattr(weights, "name", None), getattr(weights, "architecture", None)
        if not isinstance(name, str):
            raise TypeError(f"weights must be None, a tag, a name or a Weights record; got {type(weights).__name__}")
        if owner != architecture:
            raise ValueError(f"weights {name!r} are for {owner!r}, not {architecture!r}")
        weights = name
    if not available:
        raise ValueError(f"no published weights for {architecture!r} in {MANIFEST_PATH.name}")
    if weights is None:
        return available[0]
    for record in available:
        if weights in (record.name, record.name.split(".", 1)[1]):
            return record
    names = [r.name for r in available]
    raise ValueError(f"unknown weights {weights!r} for {architecture!r}; expected one of {names}")
