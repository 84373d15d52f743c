"""Command line: ``python -m resnext_hub <command>`` from the repo root."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import exit_codes
from .arguments import check_options
from .commands import classify, evaluate, export, finetune, models, predict, serve
from .console import printable
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
    if problem:  # one line, as argparse's own usage errors, but returned: callers get the status
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return exit_codes.USAGE
    if getattr(args, "progress", False) is None:
        args.progress = sys.stderr.isatty()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # CSV on stdout keeps the bytes of names that are not UTF-8 (see resnext_hub.results)
        sys.stdout.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):
        pass
    try:
        return args.func(args)
    except (WeightsUnavailableError, CheckpointError) as error:  # before ValueError: CheckpointError is one
        print_error(error)
        return exit_codes.WEIGHTS_UNAVAILABLE
    except ValueError as error:
        print_error(error)
        return exit_codes.USAGE
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): stop, without a traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        print("error: standard output was closed before all results were written", file=sys.stderr)
        return exit_codes.SOME_FAILED


def print_error(error: BaseException) -> None:
    """``error:`` and the message, each of its lines made safe (names in it may be escaped already)."""
    print(f"error: {printable(error, backslashes=False, lines=True)}", file=sys.stderr)
