"""Triton model configuration: write ``config.pbtxt`` and check it as Triton would.

The configs are built and parsed with Triton's own schema, the ``ModelConfig`` protobuf that the
``tritonclient`` package ships, so a field Triton does not know, or a value of the wrong type, is an
error here rather than at server start. Three kinds of model are written: the ONNX classifier
(:func:`build_config`), the Python-backend preprocessing model (:func:`build_preprocess_config`)
and the ensemble that chains them from image bytes to labels (:func:`build_ensemble_config`).
:func:`validate_model_dir` then checks what the schema cannot: the version folder and model file
exist, names and dims agree with the ONNX graph, batch sizes are consistent and the labels file has
one line per class; :func:`validate_repository` also checks that every ensemble step's model exists
and that the tensors passed between steps agree in type and dims.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
LABELS_FILE = "labels.txt"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")
IMAGE_INPUT = "image"  # the preprocessing model's and the ensemble's input: encoded image bytes
ENSEMBLE_OUTPUT = "probabilities"
PREPROCESSED = "preprocessed"  # the ensemble's name for the tensor passed from preprocessing to the classifier
INSTANCE_KINDS = ("cpu", "gpu")
ACCELERATORS = ("tensorrt",)


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


def build_config(
    name: str,
    *,
    image_size: int,
    num_classes: int,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instance_count: int = 1,
    accelerator: str | None = None,
    fp16: bool = False,
    labels: bool = True,
):
    """The ``ModelConfig`` message of an exported classifier (see docs/triton.md for each field).

    Inputs and outputs are FP32 even for an fp16 export (the graph casts inside). ``instance_kind``
    ``None`` leaves the choice to Triton (GPU where present). ``accelerator="tensorrt"`` asks
    ONNX Runtime's TensorRT execution provider (FP16 precision when ``fp16``).
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
    if problems:
        raise TritonConfigError("Triton config", problems)

    config = pb.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    config.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[3, image_size, image_size])
    for output in OUTPUT_NAMES:
        added = config.output.add(name=output, data_type=pb.TYPE_FP32, dims=[num_classes])
        if labels:
            added.label_filename = LABELS_FILE
    config.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if instance_kind is not None:
        kind = pb.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(kind=kind, count=instance_count)
    if accelerator == "tensorrt":
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16" if fp16 else "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
    return config


def build_preprocess_config(
    name: str,
    *,
    image_size: int,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16),
    queue_delay_us: int = 2000,
    instance_count: int = 1,
):
    """The Python-backend preprocessing model: ``image`` (BYTES ``(1,)``, the encoded file) in,
    ``input`` (FP32 ``(3, S, S)``, what the classifier takes) out; dynamic batching, CPU instances."""
    pb = _pb()
    problems = _batching_problems(max_batch_size, preferred_batch_sizes, queue_delay_us)
    if instance_count < 1:
        problems.append(f"instance count must be at least 1, got {instance_count}")
    if problems:
        raise TritonConfigError("Triton preprocessing config", problems)
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    config.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[3, image_size, image_size])
    config.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instance_count)
    return config


def build_ensemble_config(
    name: str, *, preprocess: str, classifier: str, num_classes: int, max_batch_size: int = 32, labels: bool = True
):
    """The ensemble from image bytes to class probabilities: ``image`` (BYTES ``(1,)``) through
    ``preprocess`` and ``classifier`` to ``probabilities`` (FP32 ``(classes,)``, with the labels file
    for Triton's classification extension). It has no scheduler of its own: its models batch."""
    pb = _pb()
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    config.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    output = config.output.add(name=ENSEMBLE_OUTPUT, data_type=pb.TYPE_FP32, dims=[num_classes])
    if labels:
        output.label_filename = LABELS_FILE
    first = config.ensemble_scheduling.step.add(model_name=preprocess, model_version=-1)
    first.input_map[IMAGE_INPUT] = IMAGE_INPUT
    first.output_map[INPUT_NAME] = PREPROCESSED
    second = config.ensemble_scheduling.step.add(model_name=classifier, model_version=-1)
    second.input_map[INPUT_NAME] = PREPROCESSED
    second.output_map[ENSEMBLE_OUTPUT] = ENSEMBLE_OUTPUT
    return config


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
    """``"onnx"``, ``"python"``, ``"ensemble"`` or ``"other"``: which of the models written here ``config`` is."""
    if config.platform == PLATFORM or config.backend == "onnxruntime":
        return "onnx"
    if config.backend == "python":
        return "python"
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


def validate_model_dir(model_dir: str | Path, *, version: str = "1"):
    """Check one model folder of a Triton repository (ONNX, Python backend or ensemble); return its parsed config.

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
        problems.append(f"{found}: expected {PLATFORM}, python or ensemble")
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


def _tensors(entries, pb) -> dict[str, tuple[str, list[int]]]:
    return {entry.name: (pb.DataType.Name(entry.data_type), list(entry.dims)) for entry in entries}


def _ensemble_problems(config, configs: dict, pb) -> list[str]:
    """Steps name models of the repository; every tensor passed is produced once and read with its type and dims."""
    problems = []
    ensemble_inputs = _tensors(config.input, pb)
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
        outputs = _tensors(model.output, pb)
        for key, tensor in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: output_map names {key!r}; the model's outputs are {sorted(outputs)}")
            elif tensor in produced:
                problems.append(f"{where}: {tensor!r} is already produced by {produced[tensor][2]}")
            else:
                produced[tensor] = (*outputs[key], where)
        steps.append((where, step, _tensors(model.input, pb)))
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
    for name, spec in _tensors(config.output, pb).items():
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
    pb = _pb()
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
            problems += [f"{name}: {problem}" for problem in _ensemble_problems(config, configs, pb)]
    if problems:
        raise TritonConfigError(repository, problems)
    return configs
