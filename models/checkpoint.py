"""Read checkpoint files safely and map every known key layout onto :class:`ResNet`'s names."""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .hf_config import WEIGHTS_FILE, is_hf_folder

log = logging.getLogger(__name__)

# Training checkpoints wrap the weights; the first of these keys that holds a dict wins.
WRAPPER_KEYS = ("state_dict", "model", "ema_state_dict", "state_dict_ema", "model_ema")
_MAX_LISTED = 8
# torch.save stores its records uncompressed; a zip whose records would inflate to more than this
# many times its size is not a torch checkpoint (torch would allocate what the records declare).
MAX_ZIP_EXPANSION = 4


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model."""


def _refusal_detail(message: str) -> str:
    """The line of torch's refusal that says what was refused, without its advice to load unsafely."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*?)(?: Please use|\n|$)", message)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (useful or lines[1:2] or ["unsupported content"])[0][:200]


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:  # torch.load says why, below
        return False


def _is_pickle_container(path: Path) -> bool:
    """A torch zip file or a pickle stream (protocol 2+), judged by its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def torch_zip_problem(path: Path) -> str | None:
    """Why the zip file ``path`` cannot be a torch checkpoint (cut short, another kind of zip, a zip bomb), or None.

    Reads only the zip's central directory.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception as error:  # zipfile raises several types for bytes that lie; all mean the same here
        return f"its zip structure is unreadable ({type(error).__name__}: {error})"
    if not records or "/" not in records[0].filename:
        return "a zip file, but not a torch checkpoint (its records are not in one folder)"
    # torch reads the folder name from the first record, then <folder>/data.pkl.
    folder = records[0].filename.split("/", 1)[0]
    if f"{folder}/data.pkl" not in {record.filename for record in records}:
        return f"a zip file, but not a torch checkpoint (no {folder}/data.pkl record)"
    inflated = sum(record.file_size for record in records)
    if inflated > MAX_ZIP_EXPANSION * size:
        return f"its records claim {inflated} bytes once unpacked, from a {size}-byte file"
    return None


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pth.tar`` (``weights_only=True``) or ``.safetensors`` file, or of a folder in
    timm's Hugging Face format (its ``model.safetensors``)."""
    path = Path(path)
    if is_hf_folder(path):
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # only needed for this format

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return unwrap(load_torch_file(path), str(path))


def load_torch_file(path: Path, *, mmap: bool = False) -> Any:
    """What a ``torch.save`` file holds, read with ``weights_only=True`` (plain values and tensors only);
    ``CheckpointError`` saying why not (never torch's advice to load it unsafely)."""
    if _is_zip(path):
        problem = torch_zip_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {problem}")
    try:
        # Always weights_only, passed explicitly: a checkpoint from a stranger must not run code
        # when loaded. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 only changes calls that leave it unset.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        # torch raises UnpicklingError both for a refused object and for bytes that are no pickle
        # at all (an HTML page): only the first is a "refused" checkpoint.
        if isinstance(error, pickle.UnpicklingError) and _is_pickle_container(path):
            raise CheckpointError(
                f"{path} was refused: it holds Python objects other than tensors, and unpickling them could run "
                f"code ({_refusal_detail(str(error))}). Nothing from it was executed. Only files of tensors (a state "
                "dict, or a training checkpoint holding one) are loaded; re-save trusted weights with "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from error
        raise CheckpointError(
            f"{path} could not be loaded with torch.load(weights_only=True): {_load_failure(error, path)}. "
            "Only files of tensors (a state dict, or a training checkpoint holding one) are accepted."
        ) from error


def _load_failure(error: Exception, path: Path) -> str:
    """Why torch.load failed, in a few words: never torch's advice to load with ``weights_only=False``
    (which would run whatever code the file holds)."""
    message = str(error)
    if "weights_only" in message or "WeightsUnpickler" in message:
        return f"unsupported content ({_refusal_detail(message)}); it is not a file of tensors"
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    return f"{type(error).__name__}: {message}".rstrip(": ")[:300]


def unwrap(data: object, where: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a plain or training checkpoint."""
    if isinstance(data, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{where}: expected a state dict of tensors, got {type(data).__name__}")
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{where}: no tensors found (keys: {list(data)[:_MAX_LISTED]})")
    return tensors


_LAYERS_N = re.compile(r"^layers\.(\d+)\.")
_NVIDIA_SE = {".squeeze.squeeze.": ".se.fc1.", ".squeeze.expand.": ".se.fc2."}


def canonical_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename NVIDIA/DDP/timm layouts to :class:`ResNet`'s names; SE weights become 4-D."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        key = _LAYERS_N.sub(lambda m: f"layer{int(m.group(1)) + 1}.", key)
        for old, new in _NVIDIA_SE.items():
            key = key.replace(old, new)
        if ".se.fc" in key and key.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    key_map_fn: Callable[[str], str] | None = None,
    source: str = "checkpoint",
    new_head: bool = False,
    expected_classes: str = "",
) -> None:
    """Load ``state_dict`` into ``model`` strictly (keys and shapes), after renaming.

    ``key_map_fn`` (NVIDIA's ``state_dict_key_map_fn``) is applied to every key first. A head
    (``fc``) for another number of classes than the model's is refused (``CheckpointError``: a
    random head would give confident, meaningless labels), unless ``new_head`` (the caller asked
    for another class count): the head is then left as initialised and a log line says so.
    ``expected_classes`` says where the model's class count comes from, for the refusal.
    """
    if key_map_fn is not None:
        state_dict = {key_map_fn(k): v for k, v in state_dict.items()}
    unusable = [
        f"{k} ({v.dtype}, {v.layout})"
        for k, v in state_dict.items()
        if v.layout != torch.strided or v.is_quantized or v.is_complex()
    ]
    if unusable:
        raise CheckpointError(
            f"{source} holds {len(unusable)} tensor(s) that cannot be weights of this model (sparse, quantized or "
            f"complex): {_listed(unusable)}"
        )
    state_dict = canonical_keys(state_dict)
    expected = model.state_dict()
    head_keys = [k for k in ("fc.weight", "fc.bias") if k in expected]
    head = None  # (checkpoint's, model's) class counts when the heads differ: the body is compared first
    if (
        head_keys
        and all(k in state_dict for k in head_keys)
        and state_dict["fc.weight"].shape != expected["fc.weight"].shape
    ):
        head = (tuple(state_dict["fc.weight"].shape), expected["fc.weight"].shape[0])
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
        expected = {k: v for k, v in expected.items() if k not in head_keys}
    for key in expected:
        # Older files omit BatchNorm's step counter; it does not affect the function.
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"{source} does not fit {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches ({len(wrong_shape)}): {_listed(wrong_shape)}")
        parts.append("Is it a checkpoint of this architecture? A state_dict_key_map_fn can rename keys.")
        raise CheckpointError("\n  ".join(parts))
    if head is not None and not new_head:
        found, wanted = head
        raise CheckpointError(
            f"{source}: its head fc.weight has shape {found}, {found[0]} classes, but the model expects "
            f"{wanted}{f' ({expected_classes})' if expected_classes else ''}. A head for other classes is "
            "not replaced by a random one: use the checkpoint its head belongs with (a fine-tuned best.pth "
            f"names its classes), or in Python pass num_classes={found[0]} to keep its head (classes named "
            "by index) or another num_classes to keep its backbone only"
        )
    if head is not None:
        log.info(
            "%s: head has %d classes, the model %d: loading the backbone only, fc is freshly initialised",
            source,
            head[0][0],
            head[1],
        )
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not _finite(v, expected[k].dtype)]
    if not_finite:
        # A model with NaN/Inf weights answers NaN for every image: refuse it here, not at the first forward.
        raise CheckpointError(
            f"{source} holds NaN or infinite values in {len(not_finite)} tensor(s): {_listed(not_finite)}. "
            "The file is damaged, or was saved from a training run that diverged."
        )
    # assign=True lets a model built on the meta device take the tensors without a copy.
    state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)


def _finite(tensor: Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``tensor`` is finite once in ``dtype`` (the model's).

    numpy's check is one single-threaded pass: torch's is two parallel ops per tensor, 1,300 ops for a
    101-layer network, 1.7 s of CPU time on a busy 2-core machine against numpy's 0.04 s. A value
    beyond ``dtype``'s range (a float64 1e300 for a float32 model) would be infinite in the model.
    """
    if tensor.dtype == dtype and dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(tensor.numpy(force=True)).all())
    return bool(torch.isfinite(tensor.to(dtype) if dtype.is_floating_point else tensor.float()).all())


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
