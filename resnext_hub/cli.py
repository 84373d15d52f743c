"""Command line: ``python -m resnext_hub <command>`` from the repo root."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import exit_codes
from .arguments import check_options
from .commands import classify, evaluate, export, finetune, models, predict, serve
from .models import CheckpointError, WeightsUnavailableError

# The subcommands, in the order ``--help`` lists them.
COMMANDS = (classify, models, evaluate, predict, export, serve, finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resnext_hub", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (:mod:`resnext_hub.exit_codes`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_options(args)
    if problem:
        parser.error(problem)
    if getattr(args, "progress", False) is None:
        args.progress = sys.stderr.isatty()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (WeightsUnavailableError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
