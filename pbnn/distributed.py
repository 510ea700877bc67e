"""Data-parallel training on ``torch.distributed`` (launched with ``torchrun``).

Inside ``with pbnn.distributed.data_parallel():`` (or ``pbnn.fit(..., distributed=True)``)
the shared minibatch trainer splits every global minibatch over the ranks, each rank
computes the gradient on its part, and the gradients are summed with ``all_reduce``
(weighted by each rank's share), so K ranks make exactly the update one process would
make on the union of their minibatches. Random draws that must agree (SVI's guide
sample, the minibatch permutation) come from the same seed on every rank; pbnn
broadcasts rank 0's seed when none is given.

The process group is created from torchrun's environment variables when it does not
exist yet: gloo on CPU, NCCL when CUDA is available. Every rank returns the same
Posterior (all ranks hold identical parameters after each step).

Example (single process: the context is a no-op without a multi-rank group):
    >>> import pbnn
    >>> with pbnn.distributed.data_parallel():
    ...     pbnn.distributed.world_size()
    1
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.distributed as dist

__all__ = ["data_parallel", "is_active", "rank", "world_size", "allreduce_sum_", "broadcast_seed"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("pbnn_data_parallel", default=False)


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks taking part (1 outside a data-parallel context)."""
    return dist.get_world_size() if _ACTIVE.get() and _group_ready() else 1


def rank() -> int:
    """This process's rank (0 outside a data-parallel context)."""
    return dist.get_rank() if _ACTIVE.get() and _group_ready() else 0


def is_active() -> bool:
    """True inside :func:`data_parallel` with more than one rank."""
    return world_size() > 1


@contextlib.contextmanager
def data_parallel(backend: str | None = None):
    """Run pbnn's trainers data-parallel over the ranks of the default process group.

    Creates the group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) if needed; without those variables and without a group it runs as
    a single process.
    """
    if not _group_ready() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def allreduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over ranks, in place (one flattened all_reduce)."""
    if not is_active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    pos = 0
    for t in tensors:
        t.copy_(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()


def broadcast_seed(seed: int | None) -> int | None:
    """The seed every rank should use: the given one, or rank 0's random draw."""
    if not is_active() or seed is not None:
        return seed
    t = torch.randint(0, 2**62, (1,))
    dist.broadcast(t, src=0)
    return int(t.item())
