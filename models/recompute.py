"""Gradient checkpointing of a ResNet stage: each block's activations recomputed in the backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def run_stage(stage: nn.Sequential, x: Tensor, checkpointed: bool = False) -> Tensor:
    """``stage(x)``; ``checkpointed`` (and autograd recording): each block's activations are recomputed in the
    backward pass instead of kept (``torch.utils.checkpoint``, with the RNG state kept for dropout/drop path)."""
    if not checkpointed or not torch.is_grad_enabled():
        return stage(x)
    for block in stage:
        x = checkpoint(block, x, use_reentrant=False, context_fn=lambda block=block: _recompute_context(block))
    return x


def _recompute_context(block: nn.Module) -> tuple[Any, Any]:
    # (forward context, recomputation context): torch.utils.checkpoint's context_fn.
    return nullcontext(), _batchnorm_stats_frozen(block)


@contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Recomputing a block in training mode must normalize with the batch's statistics as the forward pass
    did (the same ops, saving the same tensors), but not fold them into the running statistics a second
    time: momentum 0 keeps them as they are, and the step counter is put back afterwards."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (momentum, steps) in zip(norms, kept):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(steps)
