"""Command-line options shared by the subcommands: which model, which weights, progress."""

from __future__ import annotations

import argparse
from typing import Any

from .models import VARIANTS, ResNet, build_model


def add_model_options(parser: argparse.ArgumentParser, *, random_weights: bool = False) -> None:
    """``--model`` and one of ``--weights`` / ``--checkpoint`` (/ ``--random-weights``)."""
    parser.add_argument("--model", default="se_resnext101_32x4d", choices=sorted(VARIANTS))
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="manifest tag or name (default: the model's default weights)")
    weights.add_argument("--checkpoint", help="a local checkpoint file instead of the published weights")
    if random_weights:
        weights.add_argument("--random-weights", action="store_true", help="random weights (to try the pipeline)")


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``; neither leaves ``None`` (show it on a terminal)."""
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def model_from_args(args: argparse.Namespace, **kwargs: Any) -> ResNet:
    """The model that :func:`add_model_options`' options name."""
    pretrained = not getattr(args, "random_weights", False)
    return build_model(
        args.model, pretrained=pretrained, pretrained_from_file=args.checkpoint, weights=args.weights, **kwargs
    )
