"""Triton model configuration: generate every ``config.pbtxt`` from the contract (checked by :mod:`.validation`).

The configs are built and parsed with Triton's own schema, the ``ModelConfig`` protobuf that the
``tritonclient`` package ships, so a field Triton does not know, or a value of the wrong type, is an
error here rather than at server start. :func:`repository_configs` generates the exported
repository's models from a :class:`~.contract.Contract`: the contract's two public models as
ensembles, and the models they run (the ONNX classifier, ending in top-k; the Python-backend
preprocessing and postprocessing)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .contract import ERROR, IMAGE, INDICES, INPUT, PROBABILITIES, Contract, ModelSpec, TensorSpec

PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
# The classifier's runtimes: ONNX Runtime (model.onnx), or Triton's OpenVINO backend (model.xml + model.bin, CPU).
CLASSIFIERS = ("onnx", "openvino")
OPENVINO_BACKEND, OPENVINO_MODEL_FILE = "openvino", "model.xml"
PYTHON_MODEL_FILE = "model.py"
INSTANCE_KINDS = ("cpu", "gpu")
ACCELERATORS = ("tensorrt",)
# The models each public model runs, named after it.
CLASSIFIER_SUFFIX, PREPROCESS_SUFFIX, POSTPROCESS_SUFFIX = "_classifier", "_preprocess", "_postprocess"
# Triton's datatype names (the contract's) -> the config schema's enum names.
CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL"}


class TritonConfigError(ValueError):
    """A model folder or config that Triton would refuse or serve wrongly; lists every problem."""

    def __init__(self, where: object, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{where}: " + "; ".join(self.problems))


def parse_batch_sizes(text: str) -> list[int]:
    """``"8,16"`` -> ``[8, 16]`` (an argparse ``type``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,16; got {text!r}") from None


def config_schema():
    # Imported lazily: tritonclient is a development/serving dependency, not a torch.hub one.
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as error:
        raise ImportError(
            "Triton export needs the tritonclient package (with its gRPC extra) for Triton's model-config "
            "schema: pip install 'tritonclient[http,grpc]' (it is in requirements-dev.txt)"
        ) from error
    return model_config_pb2


def _batching_problems(max_batch_size: int, preferred_batch_sizes: Sequence[int], queue_delay_us: int) -> list[str]:
    problems = []
    if max_batch_size < 1:
        problems.append(f"max_batch_size must be at least 1, got {max_batch_size}")
    bad_sizes = [size for size in preferred_batch_sizes if not 1 <= size <= max_batch_size]
    if bad_sizes:
        problems.append(f"preferred batch sizes {bad_sizes} are outside 1..max_batch_size ({max_batch_size})")
    if queue_delay_us < 0:
        problems.append(f"queue delay must be >= 0 microseconds, got {queue_delay_us}")
    return problems


def _add(entries, specs: Sequence[TensorSpec], pb) -> None:
    for spec in specs:
        entries.add(name=spec.name, data_type=pb.DataType.Value(CONFIG_TYPES[spec.datatype]), dims=list(spec.dims))


def _model(pb, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int, **kind):
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size, **kind)
    _add(config.input, inputs, pb)
    _add(config.output, outputs, pb)
    return config


def _batched(config, preferred_batch_sizes: Sequence[int], queue_delay_us: int):
    config.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    return config


def classifier_outputs(contract: Contract) -> tuple[TensorSpec, TensorSpec]:
    """What the ONNX classifier answers: the contract's top-k ``probabilities`` and ``indices``."""
    return contract.output(PROBABILITIES), contract.output(INDICES)


def build_classifier_config(
    contract: Contract,
    *,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instance_count: int = 1,
    accelerator: str | None = None,
    fp16: bool = False,
    classifier: str = "onnx",
    bf16: bool = False,
):
    """The ``ModelConfig`` of the ONNX classifier ``<name>_classifier`` (see docs/triton.md for each field):
    the contract's ``input`` in, its top-k ``probabilities`` and ``indices`` out.

    Inputs and outputs are FP32 even for an fp16 export (the graph casts inside). ``instance_kind``
    ``None`` leaves the choice to Triton (GPU where present). ``accelerator="tensorrt"`` asks
    ONNX Runtime's TensorRT execution provider (FP16 precision when ``fp16``).
    ``classifier="openvino"``: the OpenVINO IR instead, run by Triton's OpenVINO backend on CPU instances
    (latency hint, one stream: the dynamic batcher sends whole batches; ``HINT_BF16`` for a ``bf16`` IR),
    warmed up at load with zero-filled batches of 1 and the largest preferred size (``model_warmup``).
    """
    pb = config_schema()
    problems = _batching_problems(max_batch_size, preferred_batch_sizes, queue_delay_us)
    if instance_kind is not None and instance_kind not in INSTANCE_KINDS:
        problems.append(f"instance kind must be one of {INSTANCE_KINDS} or None, got {instance_kind!r}")
    if instance_count < 1:
        problems.append(f"instance count must be at least 1, got {instance_count}")
    if accelerator is not None and accelerator not in ACCELERATORS:
        problems.append(f"accelerator must be one of {ACCELERATORS} or None, got {accelerator!r}")
    if accelerator == "tensorrt" and instance_kind == "cpu":
        problems.append("the TensorRT accelerator needs GPU instances; drop --instance-kind cpu or the accelerator")
    if classifier not in CLASSIFIERS:
        problems.append(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if classifier == "openvino" and (accelerator is not None or instance_kind == "gpu" or fp16):
        problems.append("the OpenVINO classifier runs on CPU instances in fp32, bf16 or int8: drop the GPU options")
    if problems:
        raise TritonConfigError("Triton config", problems)
    name = contract.name + CLASSIFIER_SUFFIX
    runtime = {"backend": OPENVINO_BACKEND} if classifier == "openvino" else {"platform": PLATFORM}
    config = _model(pb, name, (contract.tensor_input,), classifier_outputs(contract), max_batch_size, **runtime)
    _batched(config, preferred_batch_sizes, queue_delay_us)
    if classifier == "openvino":
        _openvino_settings(pb, config, contract, instance_count, bf16=bf16, warmup=(1, max(preferred_batch_sizes)))
        return config
    if instance_kind is not None:
        kind = pb.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(kind=kind, count=instance_count)
    if accelerator == "tensorrt":
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16" if fp16 else "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
    return config


def _openvino_settings(pb, config, contract: Contract, instance_count: int, *, bf16: bool, warmup: Sequence[int]):
    """The OpenVINO backend's parameters, CPU instances and ``model_warmup`` (its first requests compile kernels)."""
    parameters = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **({"HINT_BF16": "YES"} if bf16 else {})}
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instance_count)
    data_type = pb.DataType.Value(CONFIG_TYPES[contract.tensor_input.datatype])
    for batch in sorted(set(warmup)):
        warm = config.model_warmup.add(name=f"zeros_batch_{batch}", batch_size=batch)
        warm.inputs[INPUT].CopyFrom(
            pb.ModelWarmup.Input(data_type=data_type, dims=list(contract.tensor_input.dims), zero_data=True)
        )


def build_python_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_count: int = 1,
):
    """A Python-backend model: dynamic batching, ``instance_count`` CPU instances."""
    pb = config_schema()
    problems = _batching_problems(max_batch_size, preferred_batch_sizes, queue_delay_us)
    if instance_count < 1:
        problems.append(f"instance count must be at least 1, got {instance_count}")
    if problems:
        raise TritonConfigError(f"Triton config of {name}", problems)
    config = _model(pb, name, inputs, outputs, max_batch_size, backend="python")
    _batched(config, preferred_batch_sizes, queue_delay_us)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instance_count)
    return config


def build_ensemble_config(model: ModelSpec, steps: Sequence[tuple[str, dict, dict]], *, max_batch_size: int = 32):
    """The ensemble publishing ``model``: ``steps`` are ``(model name, input_map, output_map)``, run in order.
    It has no scheduler of its own: its models batch."""
    pb = config_schema()
    config = _model(pb, model.name, model.inputs, model.outputs, max_batch_size, platform="ensemble")
    for step_model, input_map, output_map in steps:
        step = config.ensemble_scheduling.step.add(model_name=step_model, model_version=-1)
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return config


def model_roles(contract: Contract) -> dict[str, str]:
    """Each model of the exported repository by role: the contract's ``tensor`` and ``image`` models and
    the models they run (``classifier``, ``postprocess``; ``preprocess``, ``image_postprocess``)."""
    tensor, image = contract.tensor_model.name, contract.image_model.name
    return {
        "tensor": tensor,
        "classifier": tensor + CLASSIFIER_SUFFIX,
        "postprocess": tensor + POSTPROCESS_SUFFIX,
        "image": image,
        "preprocess": tensor + PREPROCESS_SUFFIX,
        "image_postprocess": image + POSTPROCESS_SUFFIX,
    }


def repository_configs(
    contract: Contract,
    *,
    image_ensemble: bool = True,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instance_count: int = 1,
    accelerator: str | None = None,
    fp16: bool = False,
    classifier: str = "onnx",
    bf16: bool = False,
) -> dict[str, object]:
    """Every model of the exported repository, ``{name: ModelConfig}``, generated from ``contract``.

    ``<name>`` (ensemble): ``input`` -> ``<name>_classifier`` (ONNX: softmax, top-k) ->
    ``<name>_postprocess`` (Python: labels; blanks a sample whose scores are not finite).
    ``<name>_image`` (ensemble): ``image`` -> ``<name>_preprocess`` (Python: the hardened loader and
    the preset; a placeholder tensor and the reason for a bad image) -> the same classifier ->
    ``<name>_image_postprocess`` (Python: labels, and a blank top-k where preprocessing gave a reason).
    ``image_ensemble=False`` leaves out the image model and the models only it runs. ``classifier="openvino"``:
    the classifier is an OpenVINO IR (:func:`build_classifier_config`).
    """
    roles = model_roles(contract)
    batching = dict(
        max_batch_size=max_batch_size, preferred_batch_sizes=preferred_batch_sizes, queue_delay_us=queue_delay_us
    )
    top_k = classifier_outputs(contract)
    classified = {spec.name: f"classifier_{spec.name}" for spec in top_k}  # the ensembles' names for them
    answered = {spec.name: spec.name for spec in contract.outputs}
    configs = {
        roles["classifier"]: build_classifier_config(
            contract,
            instance_kind=instance_kind,
            instance_count=instance_count,
            accelerator=accelerator,
            fp16=fp16,
            classifier=classifier,
            bf16=bf16,
            **batching,
        ),
        roles["postprocess"]: build_python_config(
            roles["postprocess"], top_k, contract.outputs, instance_count=instance_count, **batching
        ),
        roles["tensor"]: build_ensemble_config(
            contract.tensor_model,
            [
                (roles["classifier"], {INPUT: INPUT}, classified),
                (roles["postprocess"], classified, answered),
            ],
            max_batch_size=max_batch_size,
        ),
    }
    if image_ensemble:
        error = contract.output(ERROR)
        configs[roles["preprocess"]] = build_python_config(
            roles["preprocess"],
            (contract.image_input,),
            (contract.tensor_input, error),
            instance_count=instance_count,
            **batching,
        )
        configs[roles["image_postprocess"]] = build_python_config(
            roles["image_postprocess"], (*top_k, error), contract.outputs, instance_count=instance_count, **batching
        )
        preprocessed = {INPUT: "preprocessed", ERROR: "preprocess_error"}
        configs[roles["image"]] = build_ensemble_config(
            contract.image_model,
            [
                (roles["preprocess"], {IMAGE: IMAGE}, preprocessed),
                (roles["classifier"], {INPUT: preprocessed[INPUT]}, classified),
                (roles["image_postprocess"], {**classified, ERROR: preprocessed[ERROR]}, answered),
            ],
            max_batch_size=max_batch_size,
        )
    return configs


def config_text(config) -> str:
    """``config.pbtxt`` text of a ``ModelConfig`` message."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)
