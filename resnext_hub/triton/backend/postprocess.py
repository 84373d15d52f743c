"""Triton Python-backend model: the classifier's top-k numbers in, the contract's answer out.

Written by ``python -m resnext_hub export --format triton`` as ``<name>_postprocess/1/model.py`` (the
tensor model's last step) and ``<name>_image_postprocess/1/model.py`` (the image model's, which also
takes the preprocessing's ``error``). Beside it: ``labels.json`` (the model's class names, index
order), for a multi-label model ``thresholds.json`` (its per-label thresholds, index order), and
``resnext_hub_image/contract.py``, a copy of the Triton contract, whose ``answer`` names the classes
and blanks the top-k of a failed sample exactly as ``serve`` does.

Needs numpy only (``requirements.txt`` beside this file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from resnext_hub_image import contract  # noqa: E402 (needs the path above)


class TritonPythonModel:
    """``probabilities`` and ``indices`` (``(k,)`` each; and ``error``) -> labels, probabilities, indices, error."""

    def initialize(self, args: dict) -> None:
        names = json.loads((HERE / "labels.json").read_text(encoding="utf-8"))
        self.labels = contract.encode_labels(names)
        thresholds = HERE / "thresholds.json"  # a multi-label model's: answers above_threshold too
        self.thresholds = json.loads(thresholds.read_text(encoding="utf-8")) if thresholds.is_file() else None
        config = json.loads(args["model_config"])
        inputs = {entry["name"]: [int(d) for d in entry["dims"]] for entry in config["input"]}
        self.takes_errors = contract.ERROR in inputs
        k = inputs[contract.INDICES][-1]
        if not 1 <= k <= len(names):
            raise pb_utils.TritonModelException(f"a top-{k} of {len(names)} classes (labels.json)")

    def execute(self, requests: list) -> list:
        """One response per request, in order."""
        return [self._respond(request) for request in requests]

    def _respond(self, request) -> pb_utils.InferenceResponse:
        def get(name: str):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        errors = None
        if self.takes_errors:
            errors = [bytes(item).decode("utf-8", "replace") for item in get(contract.ERROR).reshape(-1)]
        outputs = contract.answer(
            get(contract.PROBABILITIES), get(contract.INDICES), self.labels, errors, self.thresholds
        )
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
        )
