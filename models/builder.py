"""The one builder: construct a variant, then load and adapt its weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import torch

from .checkpoint import CheckpointError, canonical_keys, load_weights, read_checkpoint
from .download import fetch_checkpoint, forget
from .features import ResNetFeatures
from .finetuned import FinetunedMeta, read_finetuned_meta
from .meta import ModelMeta, default_classes
from .openvino_ir import openvino_ir_path
from .resnet import ResNet, check_options, feature_indices
from .variants import VARIANTS, get_config
from .weights import Weights, get_weights

log = logging.getLogger(__name__)


def build_model(
    architecture: str,
    *,
    pretrained: bool = True,
    pretrained_from_file: str | Path | None = None,
    weights: str | Weights | None = None,
    num_classes: int | None = None,
    state_dict_key_map_fn: Callable[[str], str] | None = None,
    channels_last: bool = False,
    fused_se: bool = True,
    progress: bool = True,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    in_chans: int = 3,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> ResNet | ResNetFeatures:
    """Build ``architecture`` and load weights into it; returns the model in eval mode.

    - ``pretrained``: load the published weights (downloaded once into torch.hub's cache).
    - ``pretrained_from_file``: load this local checkpoint instead (any NVIDIA or timm layout,
      ``.pth``/``.pth.tar``/``.safetensors``, or a folder in timm's Hugging Face format, as ``export --format hf``
      writes); it wins over ``pretrained``. ``pretrained=False``
      without a file gives random weights.
    - ``weights``: a manifest tag or name, or timm's ``"hf-hub:timm/<name>.<tag>"`` id of a record (default: the
      architecture's default record). The record supplies the sources (torch.hub's cache, then the Hugging Face
      cache, then the network; see :mod:`.download`), ``model.preprocessing`` and ``model.classes``.
    - ``num_classes``: default the record's (1000); another N keeps the backbone, adds a fresh head;
      0: no head (timm's meaning: the model returns the pooled features).
      A fine-tuned checkpoint (``python -m resnext_hub finetune``) sets the default to its own
      classes and gives the model its class names and preset; another N keeps its backbone only.
      A multi-label one (``finetune --multi-label``) gives a multi-label model: ``model.multi_label``,
      ``model.thresholds`` (per label, on ``model(x).sigmoid()``).
      Left unset, a file whose head has another class count is refused (``CheckpointError``),
      never given a random head; so is a fine-tuned file whose head disagrees with its class names.
    - ``state_dict_key_map_fn``: renames each checkpoint key before loading (NVIDIA's option).
    - ``channels_last``: return the model in channels-last memory format.
    - ``fused_se``: NVIDIA's option; both settings compute the same function.
    - ``progress``: show a progress bar while downloading.
    - ``features_only``: return the network as a backbone (:class:`ResNetFeatures`: a list of
      feature maps ``out_indices``, 0 = stem ... 4 = last stage, with ``feature_info``), as timm's.
    - timm's options, with timm's meanings: ``in_chans`` (input channels; loaded 3-channel weights are
      adapted as timm adapts them, see :func:`~.input_conv.adapt_input_conv`), ``global_pool`` (``"avg"``,
      ``"max"``, ``"avgmax"``, ``"catavgmax"``, ``""`` with ``num_classes=0``), ``drop_rate`` (dropout
      before ``fc``) and ``drop_path_rate`` (stochastic depth; both in training only).
    """
    if out_indices is not None and not features_only:
        raise ValueError("out_indices needs features_only=True")
    if features_only:
        feature_indices(out_indices)  # a bad index fails before any download
    if pretrained_from_file is not None and openvino_ir_path(pretrained_from_file) is not None:
        raise CheckpointError(
            f"{pretrained_from_file} is an OpenVINO IR (export --format openvino), not a weights file: load it with "
            "resnext_hub.models.openvino_ir.load_openvino_ir, or give it to the commands as --checkpoint"
        )
    config = get_config(architecture)
    record = get_weights(architecture, weights)
    finetuned = _finetuned(pretrained_from_file, architecture)
    claimed = record.num_classes if finetuned is None else len(finetuned.classes)
    # Only a count asked for that differs from the names' own may leave the head fresh (keep the backbone
    # only); otherwise the model would name classes that its random head does not predict.
    new_head = num_classes is not None and num_classes != claimed
    if num_classes is None:
        num_classes = claimed
    timm_options = {"in_chans": in_chans, "global_pool": global_pool, "drop_rate": drop_rate}
    check_options(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_options)
    loaded: Weights | None = None
    if pretrained_from_file is not None or pretrained:
        seen: os.stat_result | None = None
        if pretrained_from_file is not None:
            path, where = Path(pretrained_from_file).expanduser(), str(pretrained_from_file)
        else:
            path, _ = fetch_checkpoint(record.sources, progress=progress)
            where, loaded = f"{record.name} ({path})", record
            with suppress(OSError):
                seen = path.stat()  # which file is read: forget() must not delete a newer copy
        # A fetched file that cannot be read, or loaded into the model it was fetched for, is not trusted
        # again: forget() deletes its cached copy. The caller's own file is left alone, and so is a file
        # that a caller's key map failed to fit (the map may be what is wrong).
        try:
            state_dict = read_checkpoint(path)
        except CheckpointError as error:
            if loaded is None:
                raise
            raise CheckpointError(f"{error}\n  {forget(path, seen)}") from error
        # Built on the meta device: the checkpoint's tensors are assigned, never initialised twice.
        # A headless model (num_classes=0) and another in_chans are made from the loaded one (_as_asked).
        head = num_classes or claimed
        with torch.device("meta"):
            model = ResNet(
                config,
                head,
                global_pool=global_pool if num_classes else "avg",
                drop_rate=drop_rate,
                drop_path_rate=drop_path_rate,
                fused_se=fused_se,
                meta=_meta(architecture, record, head, loaded, finetuned),
            )
        if finetuned is not None:
            claim = f"the {len(finetuned.classes)} classes the file names"
        else:
            claim = f"the {record.num_classes} classes ({record.classes}) of {record.name}"
        try:
            load_weights(
                model,
                state_dict,
                key_map_fn=state_dict_key_map_fn,
                source=where,
                new_head=new_head,
                expected_classes=claim,
            )
        except CheckpointError as error:
            other = architecture_of_weights(state_dict, state_dict_key_map_fn, other_than=architecture)
            if other is not None:
                error = CheckpointError(
                    f"{where} holds the weights of {other}, not {architecture}: load it as {other} "
                    f"(--model {other} on the command line)\n  {error}"
                )
            if loaded is None or state_dict_key_map_fn is not None:
                raise error
            raise CheckpointError(f"{error}\n  {forget(path, seen)}") from error
        if model.fc.weight.is_meta:
            model.reset_classifier(head)
        _as_asked(model, num_classes, in_chans, global_pool)
    else:
        meta = _meta(architecture, record, num_classes or claimed, None)
        model = ResNet(config, num_classes, drop_path_rate=drop_path_rate, fused_se=fused_se, meta=meta, **timm_options)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return (ResNetFeatures(model, out_indices) if features_only else model).eval()


def _as_asked(model: ResNet, num_classes: int, in_chans: int, global_pool: str) -> None:
    """timm's options that loaded weights do not have, applied to the loaded model: a 3-channel first conv
    adapted to ``in_chans`` (timm's rule), no head for ``num_classes=0`` (with its ``global_pool``)."""
    if in_chans != 3:
        model.adapt_input_channels(in_chans)
    if not num_classes:
        model.reset_classifier(0, global_pool)


def _meta(
    architecture: str, record: Weights, num_classes: int, loaded: Weights | None, finetuned: FinetunedMeta | None = None
) -> ModelMeta:
    if finetuned is not None:
        if num_classes == len(finetuned.classes):  # its own head: its names, and a multi-label head's thresholds
            return ModelMeta(architecture, finetuned.preprocessing, finetuned.classes, thresholds=finetuned.thresholds)
        return ModelMeta(architecture, finetuned.preprocessing, default_classes(num_classes))
    classes = record.class_list if num_classes == record.num_classes else default_classes(num_classes)
    return ModelMeta(architecture, record.preprocessing, classes, weights=loaded, record=record)


def architecture_of_weights(
    state_dict: Mapping[str, torch.Tensor], key_map_fn: Callable[[str], str] | None = None, *, other_than: str
) -> str | None:
    """The architecture, other than ``other_than``, whose every parameter (the head aside) ``state_dict``
    fits, if one does: for a refusal that names what the file is."""
    if key_map_fn is not None:
        state_dict = {key_map_fn(k): v for k, v in state_dict.items()}
    shapes = _body_shapes(canonical_keys(state_dict))
    for name, config in VARIANTS.items():
        if name != other_than:
            with torch.device("meta"):
                candidate = ResNet(config, 1)
            if _body_shapes(candidate.state_dict()) == shapes:
                return name
    return None


def _body_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _finetuned(path: str | Path | None, architecture: str) -> FinetunedMeta | None:
    """The metadata of a fine-tuned checkpoint file, checked against the architecture asked for."""
    finetuned = read_finetuned_meta(Path(path).expanduser()) if path is not None else None
    if finetuned is not None and finetuned.architecture != architecture:
        raise CheckpointError(
            f"{path} was fine-tuned from {finetuned.architecture}, not {architecture}: "
            f"load it as {finetuned.architecture} (--model {finetuned.architecture} on the command line)"
        )
    return finetuned
