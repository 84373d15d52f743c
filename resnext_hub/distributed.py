"""Process groups for ``torchrun``: gloo on CPU, NCCL on CUDA, and a plain single process without it.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
every process it starts; :func:`init_distributed` reads them. Without them (or with
``WORLD_SIZE=1``) no process group is created and every collective of :class:`DistContext`
is a no-op, so the same code runs under ``python -m`` and under ``torchrun``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import exit_codes
from .engine import resolve_device

log = logging.getLogger(__name__)

# Ranks wait for each other only at the start and the end; a slow rank may trail by a while.
DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (one process)
    owns_group: bool = False  # False when the caller had already set up the group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all ranks (a copy on the CPU; ``values`` is left alone)."""
        reduced = values.detach().clone().to(self.device)
        if self.distributed:
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def raise_together(self, error: Exception | None) -> None:
        """Raise on every rank the error of the first rank (by rank) that had one; return if none had.

        For checks that fail on some ranks only (rank 0's output folder, say): every rank then stops at
        the same point with the same error, rank 0 reports it, and no rank waits in a collective for
        one that has left. ``error`` must be picklable (a message-only exception is).
        """
        errors = self.all_gather_object(error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, then each node's local rank 0, then the rest.

        For downloads into a cache: one download when the cache is shared by all nodes, one per
        node when each has its own, never two processes writing the same file at once.
        """
        stage = 0 if self.rank == 0 else 1 if self.local_rank == 0 else 2
        for _ in range(stage):  # every rank passes the same two barriers, before or after its turn
            self.barrier()
        yield
        for _ in range(2 - stage):
            self.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from error


def init_distributed(device: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, or run alone.

    The backend follows the device: NCCL for CUDA (each process on ``cuda:LOCAL_RANK``),
    gloo for CPU. A process group that already exists (set up by the caller) is used as is
    and left for the caller to destroy.
    """
    resolved = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        return DistContext(rank, world, local_rank, resolved, dist.get_backend(), owns_group=False)

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", 0)
        return DistContext(device=resolved)
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} is set but not {', '.join(missing)}: start the processes with "
            "torchrun (e.g. torchrun --nproc_per_node=2 -m resnext_hub ...), or unset WORLD_SIZE to run one process"
        )
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if resolved.type == "cuda":
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"rank {rank} wants {resolved} but this node has {torch.cuda.device_count()} GPUs: "
                "use --nproc_per_node at most the GPU count"
            )
        torch.cuda.set_device(resolved)
        dist.init_process_group("nccl", timeout=timeout, device_id=resolved)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return DistContext(rank, world, local_rank, resolved, dist.get_backend(), owns_group=True)


def current_context(device: torch.device) -> DistContext:
    """The caller's process group if one is set up, else one process on ``device``; creates nothing."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), device, dist.get_backend()
        )
    return DistContext(device=device)


def quiet_unless_main(ctx: DistContext) -> None:
    """Only rank 0 logs progress messages; the others keep warnings and errors."""
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)


def agreed_precision(ctx: DistContext, precision: str) -> str:
    """The precision every rank runs in, or ``"fp32+bf16"`` (say) and a warning when they differ."""
    chosen = sorted(set(ctx.all_gather_object(precision)))
    if len(chosen) > 1:  # e.g. mixed hardware: results would then depend on which rank got an image
        log.warning("the ranks run in different precisions %s; pass --precision fp32 to run all in fp32", chosen)
    return "+".join(chosen)


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[DistContext]:
    """``with distributed("auto") as ctx:`` -- set up, and always tear down, the process group."""
    ctx = init_distributed(device, timeout=timeout)
    try:
        yield ctx
    finally:
        shutdown_distributed(ctx)


def shard_batches(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """This rank's batches of indices ``0..count-1``: consecutive batches dealt round-robin.

    Every index falls in exactly one batch of exactly one rank, with no padding (unlike
    ``DistributedSampler``), and the batches are the same whatever the world size, so each
    image meets the same batch neighbours, and gets bit-identical outputs, in 1 or N processes.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    starts = range(rank * batch_size, count, world_size * batch_size)
    return [range(start, min(start + batch_size, count)) for start in starts]


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (what ``torchrun`` and schedulers send) into ``SystemExit`` for the block.

    Python's default SIGTERM action kills the process on the spot; as an exception it runs the
    ``finally`` blocks instead: outputs are flushed and closed, DataLoader workers shut down.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(exit_codes.TERMINATED)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
