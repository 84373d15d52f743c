"""Triton Python-backend model: encoded image bytes in, the weights' preprocessed tensor out.

Written by ``python -m resnext_hub export --format triton`` as ``<name>_preprocess/1/model.py``. Beside
it: ``preset.json`` (the weights' preset) and ``resnext_hub_image/``, copies of resnext-hub's hardened
image loader (``processing/images.py``, ``processing/fetch.py``) and its torch-free preset transform.
Each image is decoded by that loader and transformed exactly as the project does; a request holding an
unusable image gets its own error response (``INVALID_ARG``, with the loader's reason) and the other
requests batched with it are answered normally.

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

from resnext_hub_image.images import InvalidImageError, load_image  # noqa: E402 (needs the path above)
from resnext_hub_image.transform import preprocess  # noqa: E402


def _error(message: str, code: str) -> pb_utils.InferenceResponse:
    code_value = getattr(pb_utils.TritonError, code, None)  # error codes arrived in Triton 23.x
    error = pb_utils.TritonError(message) if code_value is None else pb_utils.TritonError(message, code_value)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    """``image`` (BYTES, one encoded file per row) -> ``input`` (FP32 ``(3, S, S)`` per row)."""

    def initialize(self, args: dict) -> None:
        self.preset = json.loads((HERE / "preset.json").read_text(encoding="utf-8"))
        config = json.loads(args["model_config"])
        (entry,) = config["input"]
        (output,) = config["output"]
        crop = self.preset["crop_size"]
        if [int(d) for d in output["dims"]] != [3, crop, crop]:
            raise pb_utils.TritonModelException(
                f"output {output['name']!r} has dims {output['dims']}; preset.json gives [3, {crop}, {crop}]"
            )
        self.input_name, self.output_name = entry["name"], output["name"]

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad image fails its own request only."""
        return [self._respond(request) for request in requests]

    def _respond(self, request) -> pb_utils.InferenceResponse:
        images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        rows = []
        for i, item in enumerate(images.reshape(len(images), -1)[:, 0]):
            try:
                rows.append(preprocess(load_image(bytes(item)), self.preset))
            except InvalidImageError as error:
                return _error(f"image {i} of the request: {error.reason}", "INVALID_ARG")
            except Exception as error:  # a bug or exhaustion: still this request's failure alone
                return _error(f"image {i} of the request could not be preprocessed: {error!r}", "INTERNAL")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, np.stack(rows))])
