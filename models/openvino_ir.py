"""A saved OpenVINO IR (``export --format openvino``) as a model every door runs: compiled once, never recalibrated.

The IR is a folder holding ``model.xml`` (the graph) and ``model.bin`` (the weights), the file names
Triton's OpenVINO backend reads. Its ``rt_info`` (the IR's own metadata, in ``model.xml``) carries,
under ``resnext_hub``, the keys an exported ONNX file has in its ``metadata_props``
(:mod:`resnext_hub.export.onnx_metadata`: ``classes``, ``preprocessing``, ``image_size``,
``architecture``, ``weights``, ``model_license``, ``precision``; ``int8``, ``bf16`` or ``fp32`` here) and
``format`` (:data:`IR_FORMAT`). The doors rebuild the model's class names and preset from them
(ImageNet-1k's WordNet ids too, when the names are ImageNet's).

:func:`load_openvino_ir` reads it with OpenVINO alone (NNCF is never imported: the int8 ranges are in
the graph) and compiles it through :class:`~.openvino_runtime.OpenVINORunner`, the runner of the in-process int8
path: a latency-tuned copy for batch 1, throughput streams for larger batches. ``fp32`` and ``bf16`` IRs
are compiled with that ``INFERENCE_PRECISION_HINT`` (the CPU plugin would otherwise pick bf16 for an
fp32 graph on CPUs with native bf16); ``int8`` ones with the plugin's defaults, as the in-process path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..processing.labels import ClassList, imagenet_classes
from ..processing.presets import ImageClassification
from .backend import BackendResNet
from .checkpoint import CheckpointError
from .cpu import cpu_has_native_bf16
from .meta import ModelMeta
from .openvino_runtime import OpenVINORunner
from .quantize import INSTALL_HINT
from .weights import get_weights

log = logging.getLogger(__name__)

IR_FORMAT = "resnext_hub.openvino/1"
RT_KEY = "resnext_hub"
XML_FILE = "model.xml"
BIN_FILE = "model.bin"
PRECISIONS = ("fp32", "bf16", "int8")
KEYS = ("format", "classes", "preprocessing", "image_size", "architecture", "weights", "model_license", "precision")
# The CPU plugin's INFERENCE_PRECISION_HINT per saved precision; int8 keeps the defaults (as the in-process path).
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_ir_path(path: str | Path) -> Path | None:
    """The ``model.xml`` that ``path`` names (the file, or a folder holding it), or None when it names no IR."""
    path = Path(path).expanduser()
    if path.suffix == ".xml":
        return path
    if path.is_dir() and (path / XML_FILE).is_file():
        return path / XML_FILE
    return None


def set_ir_metadata(model: Any, metadata: Mapping[str, str]) -> None:
    """Record ``metadata`` (the exported model's keys, all text) and :data:`IR_FORMAT` in an ``ov.Model``'s
    ``rt_info`` (saved with it by ``ov.save_model``)."""
    if metadata.get("precision") not in PRECISIONS:
        raise ValueError(f"an OpenVINO IR is written in one of {PRECISIONS}, not {metadata.get('precision')!r}")
    for key, value in {"format": IR_FORMAT, **metadata}.items():
        model.set_rt_info(str(value), [RT_KEY, key])


def ir_metadata(model: Any) -> dict[str, str]:
    """What an ``ov.Model`` records under ``rt_info['resnext_hub']`` (an empty dict: nothing)."""
    return {key: str(model.get_rt_info([RT_KEY, key]).astype(str)) for key in KEYS if model.has_rt_info([RT_KEY, key])}


def read_ir_metadata(model: Any, where: str | Path) -> tuple[ModelMeta, str]:
    """The :class:`ModelMeta` and precision an ``ov.Model`` records; :class:`CheckpointError` saying what is wrong."""
    found = ir_metadata(model)
    if "format" not in found:
        raise CheckpointError(
            f"{where} is an OpenVINO IR without resnext-hub's metadata (rt_info {RT_KEY}/format is missing): "
            "only IRs written by `python -m resnext_hub export --format openvino` carry the class names and preset"
        )
    if found["format"] != IR_FORMAT:
        raise CheckpointError(f"{where} is a {found['format']!r} IR; this version reads {IR_FORMAT!r}: export it again")
    try:
        precision = found["precision"]
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        names = json.loads(found["classes"])
        if not isinstance(names, list):
            raise ValueError(f"classes must be a JSON list of names, got {type(names).__name__}")
        imagenet = imagenet_classes()
        classes = imagenet if tuple(names) == imagenet.names else ClassList.of(names)
        preset = ImageClassification.from_dict(json.loads(found["preprocessing"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{where}: malformed resnext-hub metadata in the IR ({error}); export it again"
        ) from error
    architecture = found.get("architecture")
    weights = None
    if architecture and found.get("weights"):
        try:
            weights = get_weights(architecture, found["weights"])
        except (KeyError, ValueError):  # a record this version no longer has: the IR still runs
            log.info("%s: weights %r are not in this manifest", where, found["weights"])
    return ModelMeta(architecture, preset, classes, weights=weights, record=weights), precision


class OpenVINOResNet(BackendResNet):
    """A saved IR, compiled: a float ``(N, 3, H, W)`` CPU tensor in, fp32 logits out, with the IR's classes and preset.

    ``precision`` is the IR's. :meth:`optimize_for_inference` returns the model itself (it is compiled
    already), so the engine and every command run it as they run a model's fast copy.
    """

    def __init__(self, meta: ModelMeta, precision: str, runner: OpenVINORunner, path: Path) -> None:
        super().__init__(meta, "openvino", runner, None, precision=precision)
        self.path = path

    def to(self, *args: Any, **kwargs: Any) -> OpenVINOResNet:
        """Itself: it runs on the CPU only (another device is a ``ValueError``)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device.type != "cpu":
            raise ValueError(f"{self.path} is an OpenVINO IR, which runs on the CPU, not {device}: use --device cpu")
        return self

    def optimize_for_inference(
        self,
        precision: str = "auto",
        channels_last: bool = True,
        compile: bool = False,
        *,
        reuse_memory: bool = True,
        calibration: Any = None,
        int8_backend: str = "auto",
        batch_size: int | None = None,
        remeasure: bool = False,
    ) -> OpenVINOResNet:
        """Itself, compiled already: ``precision`` must be ``"auto"`` or the IR's; there is nothing to calibrate or
        measure (``batch_size`` and ``remeasure`` are accepted for the engine's sake)."""
        if precision not in ("auto", self.precision):
            raise ValueError(
                f"{self.path} is an OpenVINO IR saved in {self.precision}; it cannot run in {precision}: use "
                f"--precision auto (or {self.precision}), or export the model again at --precision {precision}"
            )
        if calibration is not None:
            raise ValueError(
                f"{self.path} is an OpenVINO IR saved in {self.precision}, calibrated when it was exported: "
                "drop --calibration"
            )
        return self

    @property
    def compile_config(self) -> dict[str, str]:
        """The CPU plugin properties it is compiled with, besides the performance hint."""
        return dict(self._run.config)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, precision={self.precision!r}"


def read_openvino_ir(path: str | Path) -> tuple[Any, ModelMeta, str, Path]:
    """A saved IR (the folder, or its ``model.xml``) read, not compiled: the ``ov.Model``, its :class:`ModelMeta`,
    its precision and the ``.xml`` path. Errors as :func:`load_openvino_ir`'s."""
    xml = openvino_ir_path(path) or Path(path)
    if not xml.is_file():
        raise CheckpointError(f"{path}: no OpenVINO IR there (expected a folder holding {XML_FILE}, or the .xml file)")
    if not xml.with_suffix(".bin").is_file():
        raise CheckpointError(f"{xml} has no {xml.with_suffix('.bin').name} beside it: the IR's weights are missing")
    if not os.access(xml, os.R_OK) or not os.access(xml.with_suffix(".bin"), os.R_OK):
        raise CheckpointError(f"{xml}: the IR cannot be read (permission denied): make it readable to this user")
    try:
        import openvino as ov
    except ImportError as error:
        raise ImportError(f"loading an OpenVINO IR needs openvino: {INSTALL_HINT} ({error})") from error
    try:
        graph = ov.Core().read_model(str(xml))
    except RuntimeError as error:
        raise CheckpointError(f"{xml} is not a readable OpenVINO IR: {str(error).splitlines()[0]}") from error
    meta, precision = read_ir_metadata(graph, xml)
    return graph, meta, precision, xml


def load_openvino_ir(path: str | Path, *, architecture: str | None = None) -> OpenVINOResNet:
    """A saved IR (the folder, or its ``model.xml``), compiled for this CPU, with its classes and preset.

    ``architecture``: the one the caller expects (a :class:`CheckpointError` if the IR holds another).
    Missing files, an IR without resnext-hub's metadata or a malformed one are :class:`CheckpointError`;
    no OpenVINO installed is an ``ImportError`` saying what to install.
    """
    graph, meta, precision, xml = read_openvino_ir(path)
    if architecture is not None and meta.architecture not in (None, architecture):
        raise CheckpointError(f"{xml} holds {meta.architecture}, not {architecture}: pass --model {meta.architecture}")
    hint = PRECISION_HINTS.get(precision)
    if hint == "bf16" and not cpu_has_native_bf16():
        log.warning("%s is a bf16 IR and this CPU has no native bf16: running it in fp32", xml)
        hint = "f32"
    config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
    return OpenVINOResNet(meta, precision, OpenVINORunner(graph, config), xml)
