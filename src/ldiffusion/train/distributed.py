"""Data-parallel training helpers for `train.loop.fit` under `torchrun` (torch.distributed).

`fit` is method-agnostic: a method may have several nets and several optimisers per stage, so
instead of wrapping nets in `DistributedDataParallel` the loop synchronises explicitly:

* at the start of `fit` (and after anything that may differ between ranks, such as restoring the
  best weights at the end of a stage) every parameter and buffer is broadcast from rank 0;
* each global batch of the seeded sample order is split into contiguous per-rank slices
  (`shard`), so `batch_size` keeps its meaning (the global batch, nnU-Net convention) and the
  data order does not depend on the number of processes;
* after back-propagation each optimiser's gradients are averaged over ranks, weighted by the
  number of samples each rank saw (`all_reduce_grads`), before clipping and the optimiser step,
  so every rank applies the same update and ends every step with identical parameters;
* running statistics of normalisation layers (BatchNorm) are broadcast from rank 0 after each
  step, as `DistributedDataParallel(broadcast_buffers=True)` does.

The process group is created once by the command line (`init_distributed`, called by
`ldiffusion train` when `WORLD_SIZE > 1`); library code only asks `world()`. Without an
initialised process group every helper is a no-op, so single-process runs are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ldiffusion.core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class World:
    """Rank of this process and number of processes (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.size > 1


def world() -> World:
    """Return the `World` of the initialised process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def init_distributed(device: torch.device, *, local_rank: int = 0, timeout_minutes: float = 60.0) -> World:
    """Initialise the default process group from the `torchrun` environment (`env://`).

    Uses NCCL on CUDA (after `torch.cuda.set_device(device)`) and gloo on CPU. Does nothing when a
    process group already exists.

    Args:
        device: the compute device of this rank (`cuda:<local_rank>` on GPUs).
        local_rank: rank on this node (logged only).
        timeout_minutes: collective timeout; rank 0 validates alone while the others wait in the
            next step's all-reduce, so this must exceed one validation pass.

    Returns:
        The `World` of this process.
    """
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build; run a single process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        logger.info("process group initialised: backend %s, rank %d of %d (local rank %d, device %s)",
                    backend, dist.get_rank(), dist.get_world_size(), local_rank, device)
    return world()


def destroy_distributed() -> None:
    """Tear down the default process group when one exists.

    Every rank first waits at a barrier: a rank that tears down its gloo pairs while another is
    still busy (rank 0 writing a report, say) can make the other abort at exit with
    "terminate called without an active exception".
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """Flush stdout, stderr and the log handlers, then end this rank's process with ``code``.

    Skips the interpreter's shutdown. After `destroy_distributed` gloo's worker threads can still be
    alive (something inside torch keeps the process group referenced); when one of them releases a
    collective's tensor while Python is finalising, it cannot take the GIL and the process aborts
    with "terminate called without an active exception" (seen in a core dump: the thread was in
    ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` during ``Py_FinalizeEx``), so
    `torchrun` reports a failed run after every output was written. Call it last, on every rank.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to save
            stream.flush()
    logging.shutdown()
    os._exit(code)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world().distributed:
        dist.barrier()


def shard(indices: Sequence[int], w: World) -> list[int]:
    """Return this rank's contiguous slice of a global batch (sizes differ by at most one).

    Example:
        >>> shard([5, 6, 7, 8, 9], World(rank=0, size=2)), shard([5, 6, 7, 8, 9], World(rank=1, size=2))
        ([5, 6, 7], [8, 9])
    """
    n, k = len(indices), w.size
    start = w.rank * (n // k) + min(w.rank, n % k)
    stop = start + n // k + (1 if w.rank < n % k else 0)
    return list(indices[start:stop])


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of `module` from rank `src` to all ranks (in place)."""
    if not world().distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def broadcast_norm_buffers(module: nn.Module, src: int = 0) -> None:
    """Broadcast the running statistics of normalisation layers (BatchNorm & co.) from rank `src`."""
    if not world().distributed:
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                for b in m.buffers(recurse=False):
                    dist.broadcast(b.data, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (picklable objects; identity in a single process)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Return True on every rank when `flag` is True on at least one rank."""
    if not world().distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_grads(params: Sequence[nn.Parameter], grads: Iterable[torch.Tensor | None],
                     weight: float) -> list[torch.Tensor | None]:
    """Average gradients over ranks, rank r weighted by `weight` (its share of the global batch).

    The gradients of all parameters are flattened into one buffer and reduced with one
    `all_reduce(SUM)` of `weight * grad` (weights sum to 1 over ranks, so for losses that are
    means over samples the result is the gradient of the global batch). A parameter without a
    gradient on some rank counts as zero there; it keeps `None` only when no rank has one, so the
    optimiser skips it exactly as in a single process.

    Args:
        params: the parameters of one optimiser (same order on every rank).
        grads: their local gradients (None where unused).
        weight: this rank's weight, `n_local / n_global`.

    Returns:
        The averaged gradients, identical on every rank.
    """
    grads = list(grads)
    if not world().distributed:
        return grads
    if not params:
        return grads
    device = params[0].device
    flat = torch.cat([(g.detach().float() * weight if g is not None else torch.zeros(p.numel(), device=device)
                       ).reshape(-1) for p, g in zip(params, grads, strict=True)] +
                     [torch.tensor([1.0 if g is not None else 0.0 for g in grads], device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    has = flat[-len(grads):]
    out: list[torch.Tensor | None] = []
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        out.append(flat[offset:offset + n].view_as(p).to(p.dtype) if has[i] > 0 else None)
        offset += n
    return out


def all_reduce_mean(values: dict[str, float], weight: float, device: torch.device) -> dict[str, float]:
    """Return the `weight`-weighted sum over ranks of scalar `values` (for logging the global loss)."""
    if not world().distributed or not values:
        return values
    keys = list(values)
    t = torch.tensor([values[k] * weight for k in keys], device=device, dtype=torch.float64
                     if device.type == "cpu" else torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


__all__ = ["World", "all_reduce_grads", "all_reduce_mean", "any_rank", "barrier", "broadcast_module",
           "broadcast_norm_buffers", "broadcast_object", "destroy_distributed", "exit_process",
           "init_distributed", "shard", "world"]
