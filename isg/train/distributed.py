"""Data-parallel training under ``torchrun`` (pytorch/examples' ddp-tutorial-series): process group, ranks, global
batches.

``torchrun --nproc-per-node N -m isg extract fit ...`` (or ``isg train``) starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init_distributed` joins them (NCCL on CUDA, gloo on CPU) and gives
each rank its device (``cuda:LOCAL_RANK``). Every rank holds the same model and draws the same random numbers;
a **global batch** of B items is split by stride (:func:`shard`: rank r takes items r, r + N, ...), so N processes
with B / N items each compute what one process computes on B: losses are means over their shard, and
:func:`sync_gradients` averages the gradients (sum over ranks / N, with equal shard sizes the gradient of the
global mean). Only rank 0 writes files and logs (:func:`is_main`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu") -> tuple[Ranks, str]:
    """Join the torchrun job (once per process) and return ``(ranks, device of this rank)``; outside torchrun
    ``(Ranks(), device)``. ``device`` ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if not launched_by_torchrun():
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: no CUDA device is available here")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    ranks = ranks_now()
    log.debug("rank %d of %d on %s", ranks.rank, ranks.world_size, device)
    return ranks, device


def ranks_now() -> Ranks:
    """The ranks of the initialised process group (``Ranks()`` when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    return ranks_now().is_main


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if ranks_now().enabled:
        dist.barrier()


def shard(items, ranks: Ranks):
    """This rank's share of a global batch (a tensor, array or list): items ``rank``, ``rank + world_size``, ..."""
    return items[ranks.rank::ranks.world_size] if ranks.enabled else items


def check_global_batch(batch_size: int, ranks: Ranks, what: str = "batch size") -> int:
    """Items per rank of a global batch of ``batch_size``; it must split evenly over the ranks."""
    if batch_size % ranks.world_size:
        raise ValueError(f"{what} {batch_size} does not split over {ranks.world_size} processes: "
                         f"use a multiple of {ranks.world_size}")
    return batch_size // ranks.world_size


def sync_gradients(parameters, ranks: Ranks) -> None:
    """Average the gradients of ``parameters`` over the ranks (one all-reduce of their concatenation)."""
    if not ranks.enabled:
        return
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= ranks.world_size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def mean_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``values`` averaged over the ranks (the mean of equal-sized shards' means: the global mean)."""
    if not ranks.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / ranks.world_size


def sum_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if not ranks.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values


__all__ = ["Ranks", "barrier", "check_global_batch", "close_distributed", "init_distributed", "is_main",
           "launched_by_torchrun", "mean_over_ranks", "ranks_now", "shard", "sum_over_ranks", "sync_gradients"]
