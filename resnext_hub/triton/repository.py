"""The exported Triton model repository: the contract's two models, as ``serve`` answers them.

``<name>/`` and ``<name>_image/`` are ensembles publishing the Triton contract (:mod:`.contract`):
preprocessed tensors or encoded image bytes in, each sample's top-k ``labels``, ``probabilities``
and ``indices`` and its ``error`` out. They run ``<name>_classifier/`` (the ONNX classifier,
ending in top-k: :mod:`.classifier`), ``<name>_preprocess/`` (Python backend: resnext-hub's own
image loader and the weights' preset; a placeholder and the reason for a bad image) and
``<name>_postprocess/`` / ``<name>_image_postprocess/`` (Python backend: the class names, and the
blank top-k of a failed sample). The Python models' code is shipped inside their folders
(:mod:`.backend`, the loader, the contract), so the repository is self-contained. Every config is
generated from the contract (:func:`.config.repository_configs`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine import clamp_top_k
from ..export.checks import VERIFY_BATCHES, ExportError, ExportResult, default_image_size
from ..export.onnx_versions import DEFAULT_OPSET
from ..models import ResNet
from ..processing import ImageClassification
from ..processing import fetch as loader_fetch
from ..processing import images as loader_images
from ..processing import transform as loader_transform
from ..processing.atomic import install_folders, staging_folder
from . import config as triton_config
from . import contract as triton_contract
from . import validation as triton_validation
from .classifier import write_classifier
from .contract import Contract

log = logging.getLogger(__name__)

SHIPPED_PACKAGE = "resnext_hub_image"
THRESHOLDS_FILE = "thresholds.json"  # beside labels.json, for a multi-label model (read by backend/postprocess.py)
BACKEND = Path(__file__).resolve().parent / "backend"
# What each Python model imports, as requirements.txt pins them (a test keeps them equal).
REQUIREMENTS = {
    "preprocess": ("pillow>=10.0", "numpy>=1.24", "urllib3>=2.6", "certifi", "validators>=0.22"),
    "postprocess": ("numpy>=1.24",),
}
# The files each Python model ships in its package: the loader's, the transform and the contract.
SHIPPED = {
    "preprocess": (
        Path(loader_images.__file__),
        Path(loader_fetch.__file__),
        Path(loader_transform.__file__),
        Path(triton_contract.__file__),
    ),
    "postprocess": (Path(triton_contract.__file__),),
}
_PACKAGE_DOC = '''"""resnext-hub's code, copied here by its Triton export.

images.py, fetch.py and transform.py are resnext_hub/processing's, contract.py is resnext_hub/triton's.
"""
'''


def _python_model(folder: Path, kind: str, config, files: dict[str, str]) -> None:
    """``folder/config.pbtxt`` and ``folder/1/``: model.py, the shipped package, requirements.txt and ``files``."""
    version = folder / "1"
    package = version / SHIPPED_PACKAGE
    package.mkdir(parents=True)
    shutil.copyfile(BACKEND / f"{kind}.py", version / triton_config.PYTHON_MODEL_FILE)
    (package / "__init__.py").write_text(_PACKAGE_DOC, encoding="utf-8")
    for source in SHIPPED[kind]:
        shutil.copyfile(source, package / source.name)
    files = {"requirements.txt": "\n".join(REQUIREMENTS[kind]) + "\n", **files}
    for name, text in files.items():
        (version / name).write_text(text, encoding="utf-8")
    (folder / "config.pbtxt").write_text(triton_config.config_text(config), encoding="utf-8")


def _image_preset(model: ResNet, size: int) -> ImageClassification:
    preset = model.preprocessing
    if size != preset.crop_size:
        raise ValueError(
            f"the image ensemble preprocesses with the weights' preset (crop {preset.crop_size}), but the "
            f"classifier is exported at {size}x{size}: drop --image-size or add --no-image-ensemble"
        )
    if preset.resize_size < preset.crop_size:
        raise ValueError(f"the image ensemble needs resize_size >= crop_size; the preset is {preset.describe()}")
    return preset


def model_folders(name: str, *, image_ensemble: bool = True) -> list[str]:
    """The model folders :func:`export_triton` writes for the model ``name`` (all of them replaced together)."""
    roles = triton_config.model_roles(Contract(name, 1, 1, 1))
    image_only = ("image", "preprocess", "image_postprocess")
    return [folder for role, folder in roles.items() if image_ensemble or role not in image_only]


def export_triton(
    model: ResNet,
    repository: str | Path,
    *,
    name: str | None = None,
    image_size: int | None = None,
    top_k: int = 5,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instance_count: int = 1,
    accelerator: str | None = None,
    labels: Sequence[str] | None = None,
    image_ensemble: bool = True,
    overwrite: bool = False,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
    classifier: str = "onnx",
    precision: str | None = None,
    calibration: Any = None,
) -> ExportResult:
    """Write the repository's models (see the module docstring) into ``repository``.

    ``top_k`` above the class count answers every class. ``labels`` default to the model's class
    names (a fine-tuned checkpoint's own). ``image_ensemble=False`` writes the tensor model alone
    (``<name>``, its classifier and postprocessing). The folders are built beside their final place,
    the ONNX file verified and every config checked against Triton's schema, the graph, each other
    (:func:`.validation.validate_repository`) and the contract, then moved into place. The result's
    ``path`` is ``<repository>/<name>``. ``classifier="openvino"``: the classifier is an OpenVINO IR for
    Triton's OpenVINO backend (:mod:`.openvino_classifier`) in ``precision`` ``fp32`` (default), ``bf16`` or
    ``int8`` (calibrated on ``calibration``, as :func:`resnext_hub.export.openvino_ir.export_openvino`).
    """
    repository = Path(repository)
    name = name or model.architecture or type(model).__name__.lower()
    size = image_size or default_image_size(model)
    num_classes = model.num_classes
    labels = list(model.classes.names) if labels is None else list(labels)
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {num_classes} classes")
    thresholds = model.thresholds  # a multi-label model answers every label, and which are above threshold
    k = num_classes if thresholds is not None else clamp_top_k(top_k, num_classes)
    contract = Contract(name, size, num_classes, k, thresholds)
    preset = _image_preset(model, size) if image_ensemble else None
    configs = triton_config.repository_configs(
        contract,
        image_ensemble=image_ensemble,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        queue_delay_us=queue_delay_us,
        instance_kind=instance_kind,
        instance_count=instance_count,
        accelerator=accelerator,
        fp16=fp16,
        classifier=classifier,
        bf16=precision == "bf16",
    )
    existing = [repository / n for n in configs if os.path.lexists(repository / n)]
    if existing and not overwrite:
        found = ", ".join(map(str, existing))
        raise ExportError(f"{found} already exists; pass overwrite=True (--overwrite) to replace it")
    roles = triton_config.model_roles(contract)
    # ASCII JSON: any name (a file name's surrogate escapes too) is written, and read back the same.
    labels_json = {"labels.json": json.dumps(labels, indent=0) + "\n"}
    if thresholds is not None:
        labels_json[THRESHOLDS_FILE] = json.dumps(list(thresholds)) + "\n"
    python_models = {roles["postprocess"]: ("postprocess", labels_json)}
    if image_ensemble:
        python_models[roles["image_postprocess"]] = ("postprocess", labels_json)
        preset_json = {"preset.json": json.dumps(preset.as_dict(), indent=2) + "\n"}
        python_models[roles["preprocess"]] = ("preprocess", preset_json)
    with staging_folder(repository / name) as staging:  # beside the model folders; removed however this ends
        for folder, config in configs.items():
            if folder in python_models:
                kind, files = python_models[folder]
                _python_model(staging / folder, kind, config, files)
                continue
            (staging / folder / "1").mkdir(parents=True)  # an ensemble's stays empty: Triton needs one
            (staging / folder / "config.pbtxt").write_text(triton_config.config_text(config), encoding="utf-8")
        if classifier == "openvino":  # OpenVINO (and NNCF for int8) load only here
            from .openvino_classifier import write_openvino_classifier

            version, ir_precision = staging / roles["classifier"] / "1", precision or "fp32"
            result = write_openvino_classifier(
                model, version, contract, precision=ir_precision, calibration=calibration, verify_batches=verify_batches
            )
        else:
            onnx_file = staging / roles["classifier"] / "1" / triton_config.MODEL_FILE
            result = write_classifier(model, onnx_file, contract, fp16=fp16, opset=opset, verify_batches=verify_batches)
        written = triton_validation.validate_repository(staging)
        problems = triton_validation.contract_problems(written, contract, image_model=image_ensemble)
        if problems:
            raise triton_config.TritonConfigError(repository, problems)
        install_folders(staging, repository, list(configs), replace=overwrite)  # each old folder kept until swapped
    log.info("Triton models %s written to %s and validated", ", ".join(configs), repository)
    return ExportResult("triton", repository / name, result.dtype, size, result.checks)
