"""A Triton model repository: the ONNX classifier, and an ensemble that takes encoded image bytes.

``<name>/`` is the classifier (ONNX Runtime backend, preprocessed FP32 input). With
``image_ensemble`` (the default) two more models make a service that takes JPEG/PNG/... bytes:
``<name>_preprocess/`` (Python backend: resnext-hub's own image loader and the weights' preset,
shipped inside the model folder so the repository is self-contained) and ``<name>_image/`` (the
ensemble: bytes -> preprocessing -> classifier -> probabilities with labels).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .. import triton as triton_config
from ..models import ResNet
from ..processing import ImageClassification
from ..processing import fetch as loader_fetch
from ..processing import images as loader_images
from ..processing.atomic import install_folders, staging_folder
from .checks import VERIFY_BATCHES, ExportError, ExportResult, default_image_size
from .onnx_file import DEFAULT_OPSET, export_onnx

log = logging.getLogger(__name__)

PREPROCESS_SUFFIX = "_preprocess"
ENSEMBLE_SUFFIX = "_image"
SHIPPED_PACKAGE = "resnext_hub_image"
SHIPPED = Path(__file__).resolve().parent / "triton_image"
# What the preprocessing model imports, as requirements.txt pins them (a test keeps the two equal).
REQUIREMENTS = ("pillow>=10.0", "numpy>=1.24", "urllib3>=2.6", "certifi", "validators>=0.22")
_PACKAGE_DOC = '''"""resnext-hub's image loader and preset transform, copied here by its Triton export.

images.py and fetch.py are resnext_hub/processing's, transform.py is resnext_hub/export/triton_image's.
"""
'''


def model_names(name: str) -> tuple[str, str, str]:
    """The classifier's, the preprocessing model's and the ensemble's names in the repository."""
    return name, name + PREPROCESS_SUFFIX, name + ENSEMBLE_SUFFIX


def write_preprocess_model(folder: Path, preset: ImageClassification, config) -> None:
    """``folder/config.pbtxt`` and ``folder/1/``: model.py, preset.json, requirements.txt, the loader's copies."""
    version = folder / "1"
    package = version / SHIPPED_PACKAGE
    package.mkdir(parents=True)
    shutil.copyfile(SHIPPED / "model.py", version / triton_config.PYTHON_MODEL_FILE)
    (version / "preset.json").write_text(json.dumps(preset.as_dict(), indent=2) + "\n", encoding="utf-8")
    (version / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n", encoding="utf-8")
    (package / "__init__.py").write_text(_PACKAGE_DOC, encoding="utf-8")
    for source in (Path(loader_images.__file__), Path(loader_fetch.__file__), SHIPPED / "transform.py"):
        shutil.copyfile(source, package / source.name)
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


def export_triton(
    model: ResNet,
    repository: str | Path,
    *,
    name: str | None = None,
    image_size: int | None = None,
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
) -> ExportResult:
    """Write ``<repository>/<name>/`` (``config.pbtxt``, ``1/model.onnx``, ``labels.txt``) and, with
    ``image_ensemble``, ``<name>_preprocess/`` and ``<name>_image/`` (see the module docstring).

    The folders are built beside their final place, the ONNX file verified and every config checked
    against Triton's schema, the graph and each other (:func:`resnext_hub.triton.validate_repository`),
    then moved into place. ``labels`` default to the model's class names. The result's ``path`` is the
    classifier's folder.
    """
    repository = Path(repository)
    name = name or model.architecture or type(model).__name__.lower()
    size = image_size or default_image_size(model)
    num_classes = model.num_classes
    if labels is None:
        labels = list(model.classes.names)
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {num_classes} classes")
    names = model_names(name) if image_ensemble else (name,)
    preset = _image_preset(model, size) if image_ensemble else None
    existing = [repository / n for n in names if os.path.lexists(repository / n)]
    if existing and not overwrite:
        found = ", ".join(map(str, existing))
        raise ExportError(f"{found} already exists; pass overwrite=True (--overwrite) to replace it")
    batching = dict(max_batch_size=max_batch_size, preferred_batch_sizes=preferred_batch_sizes)
    batching["queue_delay_us"] = queue_delay_us
    configs = [
        triton_config.build_config(
            name,
            image_size=size,
            num_classes=num_classes,
            instance_kind=instance_kind,
            instance_count=instance_count,
            accelerator=accelerator,
            fp16=fp16,
            **batching,
        )
    ]
    if image_ensemble:
        configs.append(
            triton_config.build_preprocess_config(names[1], image_size=size, instance_count=instance_count, **batching)
        )
        configs.append(
            triton_config.build_ensemble_config(
                names[2], preprocess=names[1], classifier=name, num_classes=num_classes, max_batch_size=max_batch_size
            )
        )
    with staging_folder(repository / name) as staging:  # beside the model folders; removed however this ends
        classifier = staging / name
        (classifier / "1").mkdir(parents=True)
        onnx_file = classifier / "1" / triton_config.MODEL_FILE
        result = export_onnx(model, onnx_file, image_size=size, fp16=fp16, opset=opset, verify_batches=verify_batches)
        (classifier / "config.pbtxt").write_text(triton_config.config_text(configs[0]), encoding="utf-8")
        if image_ensemble:
            write_preprocess_model(staging / names[1], preset, configs[1])
            ensemble = staging / names[2]
            (ensemble / "1").mkdir(parents=True)  # Triton needs a version folder, empty for an ensemble
            (ensemble / "config.pbtxt").write_text(triton_config.config_text(configs[2]), encoding="utf-8")
        for folder in (name, *names[2:]):  # the classifier and the ensemble have labelled outputs
            (staging / folder / triton_config.LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
        triton_config.validate_repository(staging)
        install_folders(staging, repository, names, replace=overwrite)  # each old folder kept until swapped
    log.info("Triton models %s written to %s and validated", ", ".join(names), repository)
    return ExportResult("triton", repository / name, result.dtype, size, result.checks)
