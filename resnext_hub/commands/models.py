"""``models``: the model entry points of the registry, and the published weights of each."""

from __future__ import annotations

import argparse

from .. import exit_codes
from ..models.registry import get_entry, list_models
from ..models.weights import weights_for


def run(args: argparse.Namespace) -> int:
    aliases = [name for name in list_models(aliases=True) if get_entry(name).alias_of is not None]
    for name in list_models():
        entry = get_entry(name)
        also = [alias for alias in aliases if get_entry(alias).alias_of == name]
        print(f"{name}: {entry.architecture}" + (f" (also {', '.join(also)})" if also else ""))
        for record in weights_for(entry.architecture):
            default = "  (default)" if record.default else ""
            top1 = record.accuracy.get("top1")
            print(f"  {record.name:36} {record.num_params:>11,} params  top-1 {top1}%  {record.file_name}{default}")
    return exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    parser = subparsers.add_parser("models", help="list the served models and their weights", description=__doc__)
    parser.set_defaults(func=run)
