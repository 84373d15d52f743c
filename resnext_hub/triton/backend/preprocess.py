"""Triton Python-backend model: encoded image bytes in, the weights' preprocessed tensor and an error reason out.

Written by ``python -m resnext_hub export --format triton`` as ``<name>_preprocess/1/model.py``. Beside
it: ``preset.json`` (the weights' preset) and ``resnext_hub_image/``, copies of resnext-hub's hardened
image loader (``processing/images.py``, ``processing/fetch.py``), its torch-free preset transform and
the Triton contract (``contract.py``). Each image is decoded by that loader and transformed exactly
as the project does. A sample that is not a usable image (or whose decoding or preprocessing raises
anything else) gets a placeholder tensor (zeros) and its reason in ``error``; the other samples are
answered as usual, and the ensemble's postprocessing blanks that sample's top-k (the contract's
per-sample error rule).

The Triton image needs Pillow, numpy, urllib3, certifi and validators (``requirements.txt`` beside this
file); not torch. Triton's Python backend puts this folder on ``sys.path``; the insert below keeps the
copies importable where a backend would not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from resnext_hub_image import contract  # noqa: E402 (needs the path above)
from resnext_hub_image.fetch import redact  # noqa: E402
from resnext_hub_image.images import InvalidImageError, load_image  # noqa: E402
from resnext_hub_image.transform import preprocess  # noqa: E402

MAX_REASON_CHARS = 500  # as resnext_hub.results bounds the reason of an unexpected failure


def _reason(error: Exception) -> str:
    """Why a sample failed: the loader's reason, or the type and message of anything else (bounded)."""
    if isinstance(error, InvalidImageError):
        return error.reason
    reason = f"{type(error).__name__}: {redact(str(error))}".rstrip(": ")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


class TritonPythonModel:
    """``image`` (BYTES, one encoded file per row) -> ``input`` (FP32 ``(3, S, S)``) and ``error`` (BYTES ``(1,)``)."""

    def initialize(self, args: dict) -> None:
        self.preset = json.loads((HERE / "preset.json").read_text(encoding="utf-8"))
        config = json.loads(args["model_config"])
        outputs = {output["name"]: [int(d) for d in output["dims"]] for output in config["output"]}
        crop = self.preset["crop_size"]
        self.shape = (3, crop, crop)
        dims = outputs.get(contract.INPUT)
        if dims != list(self.shape):
            raise pb_utils.TritonModelException(
                f"output {contract.INPUT!r} has dims {dims}; preset.json gives {list(self.shape)}"
            )

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad image fails its own sample only."""
        return [self._respond(request) for request in requests]

    def _respond(self, request) -> pb_utils.InferenceResponse:
        images = pb_utils.get_input_tensor_by_name(request, contract.IMAGE).as_numpy()
        rows, errors = [], []
        for item in images.reshape(len(images), -1)[:, 0]:
            try:
                rows.append(preprocess(load_image(bytes(item)), self.preset))
                errors.append(b"")
            except Exception as error:  # anything at all: this sample's failure alone
                rows.append(np.zeros(self.shape, np.float32))
                errors.append(contract.error_bytes(_reason(error)))
        error = np.empty((len(errors), 1), dtype=object)
        error[:, 0] = errors
        tensors = [pb_utils.Tensor(contract.INPUT, np.stack(rows)), pb_utils.Tensor(contract.ERROR, error)]
        return pb_utils.InferenceResponse(output_tensors=tensors)
