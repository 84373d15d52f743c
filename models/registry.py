"""The one registry of torch.hub entry points: hubconf, the CLI, the web demo and the model table read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .weights import HF_HUB_PREFIX, hf_hub_ids, weights_for_hf_hub_id

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One hub entry point. ``architecture`` is None for the processing utilities."""

    name: str
    fn: Callable[..., Any]
    architecture: str | None = None
    alias_of: str | None = None

    @property
    def is_model(self) -> bool:
        return self.architecture is not None


_ENTRIES: dict[str, Entry] = {}


def _add(entry: Entry) -> None:
    if entry.name in _ENTRIES:
        raise ValueError(f"hub entry point {entry.name!r} is registered twice")
    if entry.alias_of is not None and entry.alias_of not in _ENTRIES:
        raise ValueError(f"{entry.name!r} is an alias of {entry.alias_of!r}, which is not registered (yet)")
    _ENTRIES[entry.name] = entry


def register_model(architecture: str, *, alias_of: str | None = None) -> Callable[[F], F]:
    """Decorator: register a model builder under its function name (a duplicate name is an error)."""

    def register(fn: F) -> F:
        _add(Entry(fn.__name__, fn, architecture, alias_of))
        return fn

    return register


def register_entry(fn: F) -> F:
    """Register a hub entry point that builds no model (the processing utilities)."""
    _add(Entry(fn.__name__, fn))
    return fn


def hub_entries() -> dict[str, Callable[..., Any]]:
    """Every entry point by name: what ``hubconf.py`` exports and ``torch.hub.list`` shows."""
    return {name: entry.fn for name, entry in _ENTRIES.items()}


def list_models(*, aliases: bool = False) -> list[str]:
    """Names of the model entry points, in registration order; ``aliases`` adds the alternative names."""
    return [e.name for e in _ENTRIES.values() if e.is_model and (aliases or e.alias_of is None)]


def get_entry(name: str) -> Entry:
    """The registered entry ``name`` (``ValueError`` listing the choices)."""
    if name not in _ENTRIES:
        raise ValueError(f"unknown hub entry point {name!r}; expected one of {sorted(_ENTRIES)}")
    return _ENTRIES[name]


def split_model_id(name: str) -> tuple[str, str | None]:
    """(entry point or architecture, weights record name or None) that ``name`` asks for.

    An ``hf-hub:<org>/<name>.<tag>`` id (timm's spelling) names both; ``ValueError`` listing the ids served.
    """
    if name.startswith(HF_HUB_PREFIX):
        record = weights_for_hf_hub_id(name)
        return record.architecture, record.name
    return name, None


def architecture_of(name: str) -> str:
    """The architecture a model entry point, an architecture name itself or an ``hf-hub:`` id builds."""
    name = split_model_id(name)[0]
    for entry in _ENTRIES.values():
        if entry.is_model and name in (entry.name, entry.architecture):
            return entry.architecture  # type: ignore[return-value]
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(model_names())} or {hf_hub_ids()}")


def model_names() -> set[str]:
    """Every name a model can be asked for by: entry points (aliases too) and architectures."""
    return {name for e in _ENTRIES.values() if e.is_model for name in (e.name, e.architecture)}
