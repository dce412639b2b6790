"""torchrun helpers: who am I, how many are we, and how to split and merge work.

The same command runs on one process or many: under ``torchrun --nproc-per-node N`` the
environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, and :func:`init` joins the
process group (NCCL on GPUs, gloo on CPUs). Without them every helper answers as a world of one,
so library code calls them unconditionally.

Training uses them for DistributedDataParallel (only rank 0 writes files); evaluation shards slice
rows over ranks with :func:`shard` and merges the per-rank results with :func:`gather_objects`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from advseg.errors import UserError

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine, which picks its GPU (``LOCAL_RANK``, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment).

    Args:
        backend: ``nccl`` or ``gloo``; by default NCCL when CUDA is available, else gloo.

    Returns:
        True when running distributed after the call.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (a no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def shard(rows: Sequence[int] | np.ndarray, rank_: int | None = None, world: int | None = None):
    """This rank's share of ``rows``: every ``world``-th row starting at ``rank``.

    Strided rather than contiguous, so that slices of one scan spread over the ranks and the
    shards stay balanced. The shards are disjoint and together hold every row exactly once (no
    padding, unlike ``DistributedSampler``), so merged evaluation records count each slice once.

    Args:
        rows: positional row numbers (a list or a numpy array).
        rank_, world: default to this process's rank and the world size.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} outside a world of {world}")
    return rows[rank_::world]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (any picklable object, e.g. a records DataFrame), in rank order.

    Every rank receives the list. Objects travel between the job's own processes only;
    nothing is read from a file.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged when not distributed)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (e.g. a decision only rank 0 can take)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(action: Callable[[], T]) -> T | None:
    """Run ``action`` on rank 0 alone (writing files, filling a cache) while the others wait.

    Returns its result on rank 0 and None elsewhere. A :class:`UserError` on rank 0 is raised on
    every rank, with the same line, so that no rank waits for one that stopped.
    """
    result, error = None, None
    if is_main():
        try:
            result = action()
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result
