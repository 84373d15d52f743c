"""Which ONNX Runtime can read the files written here: the opset and IR version, set and then checked.

By default every ONNX file is opset :data:`DEFAULT_OPSET` with IR version 8, which ONNX Runtime 1.14 and
later read (ONNX Runtime's compatibility table, onnxruntime.ai/docs/reference/compatibility.html;
docs/onnx.md). torch's exporter implements opset 18 and later (``torch.onnx``'s ``TORCHLIB_OPSET``) and
stamps IR version 10; asked for an older opset it can silently keep 18. So older opsets are exported at
18 and converted with onnx's version converter, the IR version is lowered to the oldest that the opset
allows (:func:`ir_version_for`), and the file is read back (:func:`check_versions`) before it is verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import ExportError

DEFAULT_OPSET = 18
EXPORTER_OPSET = 18  # the oldest opset torch's exporter implements; older ones are converted from it
# onnx's version converter has no adapter below 14 for these graphs (Relu 14 -> 13 in onnx 1.23).
MIN_OPSET = 14
MAX_OPSET = 23  # the newest torch 2.14's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET)
IR_VERSION_METADATA = 10  # IR 10 added metadata_props to nodes, graphs, values and tensors (onnx/onnx.proto)


def opset_problem(opset: Any) -> str | None:
    """Why ``opset`` cannot be written (None: it can), in words for ``--opset``."""
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        return (
            f"opset {opset!r} is not one this export writes: give {MIN_OPSET} to {MAX_OPSET} (torch's exporter "
            f"writes none newer, onnx's version converter none older for these graphs); the default, {DEFAULT_OPSET}, "
            "is read by ONNX Runtime 1.14 and later (docs/onnx.md)"
        )
    return None


def check_opset(opset: Any) -> None:
    """Raise :class:`ExportError` if ``opset`` is not one :func:`convert` writes."""
    problem = opset_problem(opset)
    if problem:
        raise ExportError(problem)


def ir_version_for(opset: int) -> int:
    """The IR version written with ``opset``: the oldest that onnx pairs with it, but never above the exporter's
    (which stamps 10 on opsets that onnx pairs with 11)."""
    from onnx import helper

    return min(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), IR_VERSION_METADATA)


def _drop_new_reduce_attributes(model) -> None:
    """onnx's ReduceMean 18 -> 17 adapter moves ``axes`` into an attribute but keeps ``noop_with_empty_axes``,
    which older Reduce operators do not have (onnx's checker then refuses the node). Its default, 0, is the
    older operators' only behaviour, so it is dropped; any other value is left for the checker to refuse."""
    for node in model.graph.node:
        if node.op_type.startswith("Reduce"):
            for attribute in list(node.attribute):
                if attribute.name == "noop_with_empty_axes" and attribute.i == 0:
                    node.attribute.remove(attribute)


def _drop_node_metadata(model) -> None:
    """Remove the exporter's per-node debugging records (IR 10 fields: module names, rewrite rules)."""
    graph = model.graph
    for items in (graph.node, graph.value_info, graph.input, graph.output, graph.initializer):
        for item in items:
            item.ClearField("metadata_props")
    graph.ClearField("metadata_props")


def convert(model, opset: int):
    """``model`` (an ``onnx.ModelProto`` from torch's exporter) as opset ``opset`` with :func:`ir_version_for`'s
    IR version; opset imports that no node uses are dropped (ONNX Runtime's optimizer adds a list of them)."""
    import onnx
    from onnx import version_converter

    check_opset(opset)
    written = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    if written.get("ai.onnx") != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as error:  # onnx raises RuntimeError/ValidationError with its C++ assertion text
            raise ExportError(f"onnx's version converter could not write opset {opset}: {error}") from error
        _drop_new_reduce_attributes(model)
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    used = {node.domain or "ai.onnx" for node in nodes} | {"ai.onnx"}
    for entry in list(model.opset_import):
        if (entry.domain or "ai.onnx") not in used:
            model.opset_import.remove(entry)
    model.ir_version = ir_version_for(opset)
    if model.ir_version < IR_VERSION_METADATA:
        _drop_node_metadata(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the graph converted to opset {opset} is not valid ONNX: {error}") from error
    return model


def written_versions(path: str | Path) -> tuple[int | None, int]:
    """The standard-domain opset and the IR version of the ONNX file at ``path`` (its graph is not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opsets = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return (max(opsets) if opsets else None), model.ir_version


def check_versions(path: str | Path, opset: int, *, name: str | None = None) -> None:
    """Read the file back: its opset must be ``opset`` and its IR version :func:`ir_version_for`'s, else
    :class:`ExportError` (torch's exporter can write another opset than it was asked for)."""
    found_opset, found_ir = written_versions(path)
    want_ir = ir_version_for(opset)
    if (found_opset, found_ir) != (opset, want_ir):
        raise ExportError(
            f"{name or Path(path).name} was written as opset {found_opset}, IR version {found_ir}; "
            f"opset {opset}, IR version {want_ir} was asked for: this torch/onnx cannot write it, try another --opset"
        )
