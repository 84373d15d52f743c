"""timm's ``pretrained_cfg`` of a model, generated from its weights record and preset.

timm's data pipeline reads it (``timm.data.resolve_model_data_config(model)``): with it, timm's own
transform (``create_transform``) is the one the weights expect. timm describes the eval transform as
``Resize(floor(size / crop_pct))`` then ``CenterCrop(size)``; a preset's ``resize_size`` and
``crop_size`` become the ``crop_pct`` that gives back exactly that resize.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..processing.presets import ImageClassification
from .weights import Weights

# A license given as an identifier (SPDX), which timm writes in lower case; other text is kept as it is.
_LICENSE_ID = re.compile(r"^[A-Za-z0-9.+-]+$")
REDUCTION = 32  # the network's output stride


def crop_pct(preset: ImageClassification) -> float:
    """The ``crop_pct`` with the fewest decimals for which timm's resize, ``floor(crop_size / crop_pct)``,
    is ``resize_size``."""
    exact = preset.crop_size / preset.resize_size
    candidates = [round(exact, digits) for digits in range(2, 16)]
    nudged = exact
    for _ in range(8):  # the exact ratio can round to just below resize_size: step towards larger quotients
        candidates.append(nudged)
        nudged = math.nextafter(nudged, 0.0)
    for pct in candidates:
        if pct > 0 and math.floor(preset.crop_size / pct) == preset.resize_size:
            return pct
    raise ValueError(f"no crop_pct gives a resize of {preset.resize_size} for a {preset.crop_size} crop")


def hf_hub_id(record: Weights) -> str | None:
    """The Hugging Face repo id (``"timm/<name>.<tag>"``) of the first source on the Hub; None without one."""
    return record.hf_hub_id


def pretrained_cfg(
    preprocessing: ImageClassification,
    *,
    architecture: str | None,
    num_classes: int,
    first_conv: str,
    record: Weights | None = None,
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` dict: the weights' input transform (``input_size``, ``interpolation``,
    ``crop_pct``, ``crop_mode``, ``mean``, ``std``; the test size where ``record`` has a test preset) and
    what they are (``architecture``, ``tag``, ``url``, ``hf_hub_id``, ``license``, ``num_classes``,
    ``first_conv``, ``classifier``). ``num_classes`` is the weights' (as timm's: not a replaced head's)."""
    size = preprocessing.crop_size
    pool = -(-size // REDUCTION)
    cfg: dict[str, Any] = {}
    if record is not None:
        cfg["url"] = record.url
        hub_id = hf_hub_id(record)
        if hub_id is not None:
            cfg["hf_hub_id"] = hub_id
    cfg["architecture"] = architecture
    if record is not None:
        cfg["tag"] = record.name.split(".", 1)[1]
    cfg.update(custom_load=False, input_size=(3, size, size))
    test = record.test_preprocessing if record is not None else None
    if test is not None:
        cfg["test_input_size"] = (3, test.crop_size, test.crop_size)
    cfg.update(fixed_input_size=False, interpolation=preprocessing.interpolation, crop_pct=crop_pct(preprocessing))
    if test is not None:
        cfg["test_crop_pct"] = crop_pct(test)
    cfg.update(
        crop_mode="center",
        mean=preprocessing.mean,
        std=preprocessing.std,
        num_classes=num_classes,
        pool_size=(pool, pool),
        first_conv=first_conv,
        classifier="fc",
    )
    if record is not None and record.license:
        cfg["license"] = record.license.lower() if _LICENSE_ID.match(record.license) else record.license
    return cfg
