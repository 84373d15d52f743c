"""Test stand-in for Triton's ONNX Runtime backend, which PyTriton's tritonserver does not ship.

A Python-backend model with the exported classifier's config (platform swapped for ``backend:
"python"``) that runs the same ``1/model.onnx`` with the onnxruntime package: the ensemble around
it is then Triton's own, end to end. Copied in as ``<name>_classifier/1/model.py`` by triton_servers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model = Path(__file__).resolve().parent / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        config = json.loads(args["model_config"])
        self.input = config["input"][0]["name"]
        self.outputs = [output["name"] for output in config["output"]]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            values = self.session.run(self.outputs, {self.input: x})
            tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
