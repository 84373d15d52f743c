"""Triton model configuration: generate every ``config.pbtxt`` from the contract, and check them as Triton would.

The configs are built and parsed with Triton's own schema, the ``ModelConfig`` protobuf that the
``tritonclient`` package ships, so a field Triton does not know, or a value of the wrong type, is an
error here rather than at server start. :func:`repository_configs` generates the exported
repository's models from a :class:`~.contract.Contract`: the contract's two public models as
ensembles, and the models they run (the ONNX classifier, ending in top-k; the Python-backend
preprocessing and postprocessing). :func:`contract_problems` checks configs against the contract.
:func:`validate_model_dir` then checks what the schema cannot: the version folder and model file
exist, names and dims agree with the ONNX graph, batch sizes are consistent and a labels file has
one line per class; :func:`validate_repository` also checks that every ensemble step's model exists
and that the tensors passed between steps agree in type and dims.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def _pb():
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
    pb = _pb()
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
    pb = _pb()
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
    pb = _pb()
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


def tensors(entries) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (datatype, dims)}`` of a config's inputs or outputs, datatypes as the contract spells them."""
    pb = _pb()
    names = {value: key for key, value in CONFIG_TYPES.items()}
    found = {}
    for entry in entries:
        config_type = pb.DataType.Name(entry.data_type)
        found[entry.name] = (names.get(config_type, config_type), tuple(entry.dims))
    return found


def contract_problems(configs: Mapping[str, object], contract: Contract, *, image_model: bool = True) -> list[str]:
    """How ``configs`` (``{name: ModelConfig}``) differ from the contract's public models (empty: they agree)."""
    problems = []
    for model in contract.models if image_model else (contract.tensor_model,):
        config = configs.get(model.name)
        if config is None:
            problems.append(f"no model {model.name!r} (the contract's)")
            continue
        sides = (("inputs", config.input, model.inputs), ("outputs", config.output, model.outputs))
        for kind, declared, specs in sides:
            found = tensors(declared)
            expected = {spec.name: (spec.datatype, spec.dims) for spec in specs}
            if found != expected:
                problems.append(f"{model.name}: {kind} {found} in the config, the contract's are {expected}")
    return problems


def config_text(config) -> str:
    """``config.pbtxt`` text of a ``ModelConfig`` message."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def read_config(path: str | Path):
    """Parse ``config.pbtxt`` with Triton's schema; unknown fields or wrong types are errors."""
    from google.protobuf import text_format

    pb = _pb()
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except FileNotFoundError:
        raise TritonConfigError(path, ["no config.pbtxt"]) from None
    except text_format.ParseError as error:
        raise TritonConfigError(path, [f"not a valid Triton model config: {error}"]) from error


# ONNX TensorProto element types -> Triton data types (the ones a classifier export can have).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8"}


def onnx_signature(path: str | Path) -> dict[str, dict[str, tuple[str, list[int | str]]]]:
    """``{"inputs"|"outputs": {name: (triton type, dims)}}`` of an ONNX file; symbolic dims are names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def describe(values) -> dict[str, tuple[str, list[int | str]]]:
        found = {}
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
            found[value.name] = (_ONNX_TO_TRITON.get(tensor.elem_type, f"onnx elem_type {tensor.elem_type}"), dims)
        return found

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _check_io(kind: str, declared, graph: dict, batched: bool, pb) -> list[str]:
    problems = []
    names = [entry.name for entry in declared]
    if sorted(names) != sorted(graph):
        problems.append(f"{kind} names {sorted(names)} in config.pbtxt, {sorted(graph)} in the ONNX graph")
    for entry in declared:
        if entry.name not in graph:
            continue
        onnx_type, onnx_dims = graph[entry.name]
        config_type = pb.DataType.Name(entry.data_type)
        if config_type != onnx_type:
            problems.append(f"{kind} {entry.name!r}: data_type {config_type} in config, {onnx_type} in the graph")
        dims = list(onnx_dims)
        if batched:
            if not dims or isinstance(dims[0], int):
                problems.append(
                    f"{kind} {entry.name!r}: max_batch_size > 0 needs a dynamic first (batch) axis, "
                    f"the graph has dims {onnx_dims}"
                )
                continue
            dims = dims[1:]
        expected = [d if isinstance(d, int) else -1 for d in dims]
        if list(entry.dims) != expected:
            problems.append(f"{kind} {entry.name!r}: dims {list(entry.dims)} in config, {expected} in the graph")
    return problems


def model_kind(config) -> str:
    """``"onnx"``, ``"openvino"``, ``"python"``, ``"ensemble"`` or ``"other"``: which of the models written here
    ``config`` is."""
    if config.platform == PLATFORM or config.backend == "onnxruntime":
        return "onnx"
    if config.backend == "python":
        return "python"
    if config.backend == OPENVINO_BACKEND:
        return "openvino"
    if config.platform == "ensemble":
        return "ensemble"
    return "other"


def _onnx_problems(model_dir: Path, version: str, config, pb) -> list[str]:
    problems = []
    model_file = model_dir / version / (config.default_model_filename or MODEL_FILE)
    if not model_file.is_file():
        problems.append(f"no model file {model_file.relative_to(model_dir)}")
    gpu_accel = config.optimization.execution_accelerators.gpu_execution_accelerator
    if gpu_accel and any(g.kind == pb.ModelInstanceGroup.KIND_CPU for g in config.instance_group):
        problems.append("a GPU execution accelerator is set but instances are KIND_CPU")
    if model_file.is_file():
        signature = onnx_signature(model_file)
        batched = config.max_batch_size > 0
        problems += _check_io("input", config.input, signature["inputs"], batched, pb)
        problems += _check_io("output", config.output, signature["outputs"], batched, pb)
    return problems


def openvino_signature(path: str | Path) -> dict[str, dict[str, tuple[str, list[int | str]]]]:
    """:func:`onnx_signature` of an OpenVINO IR (``model.xml``): tensor names, Triton types, dims (``"?"``: dynamic)."""
    import openvino as ov

    graph = ov.Core().read_model(str(path))
    types = {ov.Type.f32: "TYPE_FP32", ov.Type.f16: "TYPE_FP16", ov.Type.i64: "TYPE_INT64", ov.Type.i32: "TYPE_INT32"}

    def describe(ports) -> dict[str, tuple[str, list[int | str]]]:
        found = {}
        for port in ports:
            dims = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
            found[port.get_any_name()] = (types.get(port.get_element_type(), str(port.get_element_type())), dims)
        return found

    return {"inputs": describe(graph.inputs), "outputs": describe(graph.outputs)}


def _openvino_problems(model_dir: Path, version: str, config, pb) -> list[str]:
    model_file = model_dir / version / (config.default_model_filename or OPENVINO_MODEL_FILE)
    missing = [path for path in (model_file, model_file.with_suffix(".bin")) if not path.is_file()]
    if missing:
        return [f"no model file {path.relative_to(model_dir)}" for path in missing]
    if any(group.kind != pb.ModelInstanceGroup.KIND_CPU for group in config.instance_group):
        return ["Triton's OpenVINO backend runs on the CPU: instance groups must be KIND_CPU"]
    signature = openvino_signature(model_file)
    batched = config.max_batch_size > 0
    return _check_io("input", config.input, signature["inputs"], batched, pb) + _check_io(
        "output", config.output, signature["outputs"], batched, pb
    )


def validate_model_dir(model_dir: str | Path, *, version: str = "1"):
    """Check one model folder of a Triton repository (ONNX, OpenVINO, Python backend or ensemble); return its config.

    Raises :class:`TritonConfigError` naming every problem found.
    """
    pb = _pb()
    model_dir = Path(model_dir)
    config = read_config(model_dir / "config.pbtxt")
    problems = []
    if config.name and config.name != model_dir.name:
        problems.append(f"name {config.name!r} differs from the folder name {model_dir.name!r} (Triton refuses it)")
    kind = model_kind(config)
    if kind == "onnx":
        problems += _onnx_problems(model_dir, version, config, pb)
    elif kind == "openvino":
        problems += _openvino_problems(model_dir, version, config, pb)
    elif kind == "python":
        if not (model_dir / version / PYTHON_MODEL_FILE).is_file():
            problems.append(f"no {version}/{PYTHON_MODEL_FILE} (the Python backend's entry point)")
    elif kind == "ensemble":
        if not (model_dir / version).is_dir():
            problems.append(f"no version folder {version}/ (Triton needs one, empty, for an ensemble)")
        if not config.ensemble_scheduling.step:
            problems.append("an ensemble needs ensemble_scheduling steps")
    else:
        found = f"platform {config.platform!r}, backend {config.backend!r}"
        problems.append(f"{found}: expected {PLATFORM}, {OPENVINO_BACKEND}, python or ensemble")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size is {config.max_batch_size}; 0 disables batching, > 0 enables it")
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        too_big = [s for s in config.dynamic_batching.preferred_batch_size if s > config.max_batch_size or s < 1]
        if too_big:
            problems.append(f"preferred_batch_size {too_big} outside 1..max_batch_size ({config.max_batch_size})")
    for output in config.output:
        if not output.label_filename:
            continue
        labels_path = model_dir / output.label_filename
        if not labels_path.is_file():
            problems.append(f"output {output.name!r}: label file {output.label_filename!r} is missing")
            continue
        lines = labels_path.read_text(encoding="utf-8").splitlines()
        classes = output.dims[-1] if output.dims else 0
        if len(lines) != classes:
            problems.append(f"output {output.name!r}: {len(lines)} lines in {output.label_filename}, {classes} classes")
    if problems:
        raise TritonConfigError(model_dir, problems)
    return config


def _ensemble_problems(config, configs: dict) -> list[str]:
    """Steps name models of the repository; every tensor passed is produced once and read with its type and dims."""
    problems = []
    ensemble_inputs = tensors(config.input)
    produced = {name: (*spec, "the ensemble's input") for name, spec in ensemble_inputs.items()}
    steps = []
    for number, step in enumerate(config.ensemble_scheduling.step, 1):
        where = f"step {number} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{where}: no such model in the repository")
            continue
        if config.max_batch_size > 0 and not 0 < config.max_batch_size <= model.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} < the ensemble's {config.max_batch_size}")
        outputs = tensors(model.output)
        for key, tensor in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: output_map names {key!r}; the model's outputs are {sorted(outputs)}")
            elif tensor in produced:
                problems.append(f"{where}: {tensor!r} is already produced by {produced[tensor][2]}")
            else:
                produced[tensor] = (*outputs[key], where)
        steps.append((where, step, tensors(model.input)))
    consumed = set()
    for where, step, inputs in steps:
        unmapped = sorted(set(inputs) - set(step.input_map))
        if unmapped:
            problems.append(f"{where}: model inputs {unmapped} are not mapped")
        for key, tensor in step.input_map.items():
            consumed.add(tensor)
            if key not in inputs:
                problems.append(f"{where}: input_map names {key!r}; the model's inputs are {sorted(inputs)}")
            elif tensor not in produced:
                problems.append(f"{where}: input {key!r} reads {tensor!r}, which nothing produces")
            elif tuple(produced[tensor][:2]) != inputs[key]:
                found = produced[tensor]
                problems.append(f"{where}: input {key!r} is {inputs[key]}, {tensor!r} from {found[2]} is {found[:2]}")
    for name, spec in tensors(config.output).items():
        if name not in produced:
            problems.append(f"output {name!r}: no step produces it")
        elif tuple(produced[name][:2]) != spec:
            problems.append(f"output {name!r} is {spec} in the config, {produced[name][:2]} from {produced[name][2]}")
    unused = sorted(set(ensemble_inputs) - consumed)
    if unused:
        problems.append(f"inputs {unused} are read by no step")
    return problems


def validate_repository(repository: str | Path, *, version: str = "1") -> dict:
    """Check every model folder of a repository (:func:`validate_model_dir`) and every ensemble's wiring.

    Returns ``{name: config}``; raises :class:`TritonConfigError` naming every problem found.
    """
    repository = Path(repository)
    configs, problems = {}, []
    for folder in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        try:
            configs[folder.name] = read_config(folder / "config.pbtxt")  # the wiring is checked whatever else is wrong
            validate_model_dir(folder, version=version)
        except TritonConfigError as error:
            problems += [f"{folder.name}: {problem}" for problem in error.problems]
    if not configs and not problems:
        problems.append("no model folders (none has a config.pbtxt)")
    for name, config in configs.items():
        if model_kind(config) == "ensemble":
            problems += [f"{name}: {problem}" for problem in _ensemble_problems(config, configs)]
    if problems:
        raise TritonConfigError(repository, problems)
    return configs
