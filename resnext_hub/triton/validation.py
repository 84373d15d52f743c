"""Check Triton model configurations as Triton would, and against the contract.

:func:`read_config` parses ``config.pbtxt`` with Triton's own schema (:func:`.config.config_schema`).
:func:`contract_problems` checks configs against the contract. :func:`validate_model_dir` then checks
what the schema cannot: the version folder and model file exist, names and dims agree with the ONNX
graph (or the OpenVINO IR), batch sizes are consistent and a labels file has one line per class;
:func:`validate_repository` also checks that every ensemble step's model exists and that the tensors
passed between steps agree in type and dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .config import (
    CONFIG_TYPES,
    MODEL_FILE,
    OPENVINO_BACKEND,
    OPENVINO_MODEL_FILE,
    PLATFORM,
    PYTHON_MODEL_FILE,
    TritonConfigError,
    config_schema,
)
from .contract import Contract


def tensors(entries) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (datatype, dims)}`` of a config's inputs or outputs, datatypes as the contract spells them."""
    pb = config_schema()
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


def read_config(path: str | Path):
    """Parse ``config.pbtxt`` with Triton's schema; unknown fields or wrong types are errors."""
    from google.protobuf import text_format

    pb = config_schema()
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
    pb = config_schema()
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
