"""Data-parallel training and parallel chains on ``torch.distributed`` (launched with ``torchrun``;
see ``docs/distributed.md``). Inside ``data_parallel()`` minibatch trainers split each global
batch over the ranks and sum the gradients; chain samplers and ensembles give each rank a block
of chains seeded by global index, so any number of ranks returns what one process returns.

Every collective pbnn runs waits at most ``timeout`` seconds (``data_parallel(timeout=...)``,
``pbnn.fit(..., distributed=True, timeout=...)``; default :data:`DEFAULT_TIMEOUT`, 300 s) for
the other ranks: a rank that stopped, crashed or is stuck ends the job with a
:class:`DistributedTimeoutError` naming the timeout, instead of blocking for the backend's own
default (30 minutes for gloo). The collectives are started with ``async_op=True`` and waited
on with that timeout, so this holds for a group the user created too; a group that pbnn
creates (from torchrun's environment) gets the same ``init_process_group(timeout=...)``, which
also bounds the rendezvous. For a group you create yourself, pass
``init_process_group(..., timeout=datetime.timedelta(seconds=...))`` to bound the rendezvous and
collectives outside pbnn.

Example (single process: the context is a no-op without a multi-rank group):
    >>> import pbnn
    >>> with pbnn.distributed.data_parallel():
    ...     pbnn.distributed.world_size()
    1
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import math
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pbnn.core.data import Batch

__all__ = [
    "data_parallel",
    "is_active",
    "in_context",
    "rank",
    "world_size",
    "allreduce_sum_",
    "broadcast_seed",
    "data_parallel_grad",
    "chain_slice",
    "rank_local",
    "map_chains",
    "run_batched_chains",
    "gather_chains",
    "all_gather",
    "mean_over_chains",
    "DEFAULT_TIMEOUT",
    "DistributedTimeoutError",
    "check_timeout",
    "check_loader",
    "local_cuda_device",
    "rng_devices",
]

T = TypeVar("T")

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("pbnn_data_parallel", default=False)

DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits for the others in one collective before the job ends with an error."""

_TIMEOUT: contextvars.ContextVar[float] = contextvars.ContextVar("pbnn_timeout", default=DEFAULT_TIMEOUT)


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within the timeout (or failed): another rank stopped,
    crashed, is stuck, or called ``pbnn.fit`` with other arguments."""


def check_timeout(timeout: float | None) -> float:
    """The timeout in seconds (None: :data:`DEFAULT_TIMEOUT`); a ValueError unless a finite
    positive number.

    Example:
        >>> check_timeout(None), check_timeout(5)
        (300.0, 5.0)
    """
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(
            f"timeout must be a positive number of seconds (the longest a rank waits for the others "
            f"in one collective), got {timeout!r}; e.g. timeout=600, or leave it out for {DEFAULT_TIMEOUT:g} s"
        )
    return float(timeout)


def check_loader(sharded: bool, *, split: bool) -> None:
    """A loader's sampler against how it is read: a data-parallel trainer (``split``: each rank
    one share of every batch) needs a ``DistributedSampler``; a trainer that runs on one rank
    alone (members, chains) needs all the data, so no ``DistributedSampler`` shard.

    Example:
        >>> check_loader(False, split=False)
    """
    if split and not sharded:
        raise ValueError(
            f"distributed=True trains data-parallel over {world_size()} ranks, so each rank must read its own "
            "share of the data: build the loader with sampler=torch.utils.data.DistributedSampler(dataset) "
            "(pbnn calls its set_epoch every pass)"
        )
    if sharded and not split:
        raise ValueError(
            "the loader's DistributedSampler gives this rank only its shard, but this trainer runs on one rank "
            "alone (ensemble / MultiSWAG members, separate chains) and needs all the data: pass a loader with a "
            "plain sampler on every rank"
        )


def _run(op: str, start: Callable[[], Any]) -> None:
    """Start a collective (``start()`` calls it with ``async_op=True``) and wait for it at most
    the current timeout; a :class:`DistributedTimeoutError` if it fails or times out."""
    timeout = _TIMEOUT.get()
    try:
        start().wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as err:
        raise DistributedTimeoutError(
            f"pbnn.distributed: {op} on rank {dist.get_rank()} of {dist.get_world_size()} failed or did not "
            f"complete within timeout={timeout:g} s: another rank stopped, crashed or is stuck, or the ranks called "
            "pbnn.fit with different arguments (every rank must make the same call). If a rank legitimately "
            f"needs longer between collectives, pass a larger timeout=. ({err})"
        ) from err


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


def in_context() -> bool:
    """True inside :func:`data_parallel` (with any number of ranks, 1 included), outside :func:`rank_local`."""
    return _ACTIVE.get()


@contextlib.contextmanager
def data_parallel(backend: str | None = None, timeout: float | None = None):
    """Run pbnn's trainers data-parallel over the ranks of the default process group (created
    from torchrun's environment if needed: gloo on CPU, NCCL with CUDA, with
    ``init_process_group(timeout=timeout)``; else a single process). Each collective inside
    waits at most ``timeout`` seconds (None: :data:`DEFAULT_TIMEOUT`) for the other ranks, then
    raises :class:`DistributedTimeoutError` (module docstring)."""
    seconds = check_timeout(timeout)
    if not _group_ready() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = local_cuda_device(backend)
        if device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    token, timeout_token = _ACTIVE.set(True), _TIMEOUT.set(seconds)
    try:
        yield
    finally:
        _TIMEOUT.reset(timeout_token)
        _ACTIVE.reset(token)


def local_cuda_device(backend: str, environ: dict | None = None) -> int | None:
    """The CUDA device a rank takes before pbnn creates an NCCL group: torchrun's ``LOCAL_RANK``
    (NCCL needs one GPU per rank; without ``torch.cuda.set_device`` every rank would use GPU 0).
    None for other backends (gloo: the model's device is the user's choice).

    Example:
        >>> local_cuda_device("nccl", {"LOCAL_RANK": "3"}), local_cuda_device("gloo", {"LOCAL_RANK": "3"})
        (3, None)
    """
    if backend != "nccl":
        return None
    return int((os.environ if environ is None else environ).get("LOCAL_RANK", 0))


def rng_devices() -> list[int]:
    """The CUDA devices whose RNG a seeded block forks and restores: the current one once CUDA is
    in use, else none. Not every visible device: forking one creates a context on it (under
    torchrun, on every other rank's GPU).

    Example (CPU only):
        >>> import torch
        >>> rng_devices() == ([torch.cuda.current_device()] if torch.cuda.is_initialized() else [])
        True
    """
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _collective_device() -> torch.device | None:
    """Where a collective's own tensors live: NCCL only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def allreduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over ranks, in place (one flattened all_reduce)."""
    if not is_active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _run("all_reduce", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
    pos = 0
    for t in tensors:
        t.copy_(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()


def broadcast_seed(seed: int | None) -> int | None:
    """The seed every rank should use: the given one, or rank 0's random draw."""
    if not is_active() or seed is not None:
        return seed
    t = torch.randint(0, 2**62, (1,)).to(_collective_device())
    _run("broadcast", lambda: dist.broadcast(t, src=0, async_op=True))
    return int(t.item())


def data_parallel_grad(
    log_joint: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, idx: torch.Tensor | None, n: int
) -> torch.Tensor:
    """Gradient in ``z`` of ``log_joint`` on the global minibatch ``idx`` (None: all ``n`` rows),
    as one process computes it: each rank weights its share of ``idx`` by its size and the
    gradients are summed. ``log_joint(rows)`` must scale the likelihood by ``n / len(rows)``.
    ``idx`` may be a loader's :class:`pbnn.data.Batch`: this rank's share already.

    Example (one process: the whole batch):
        >>> import torch
        >>> z = torch.tensor([1.0], requires_grad=True)
        >>> data_parallel_grad(lambda rows: -(z**2).sum() * len(rows), z, None, 4)
        tensor([-8.])
    """
    if isinstance(idx, Batch):  # a loader's batch: a DistributedSampler already gave each rank an equal share
        mine, whole = idx, len(idx) * world_size()
    else:
        idx = torch.arange(n) if idx is None else idx
        mine, whole = idx.tensor_split(world_size())[rank()], len(idx)
    if len(mine) == 0:  # a batch smaller than the number of ranks leaves this rank idle
        g = torch.zeros_like(z)
    else:
        (g,) = torch.autograd.grad(log_joint(mine) * (len(mine) / whole), z)
    allreduce_sum_([g])
    return g


# ---------------------------------------------------------------------------- parallel chains
def chain_slice(num_chains: int, *, every_rank: bool = False) -> slice:
    """This rank's chains: contiguous blocks in rank order, sizes differing by at most one
    (``every_rank=True``: a ValueError when some rank would get none).

    Example (one process: all chains):
        >>> chain_slice(4)
        slice(0, 4, None)
    """
    k, r = world_size(), rank()
    if every_rank and num_chains < k:
        raise ValueError(
            f"{num_chains} chains/members cannot be spread over {k} ranks: use at least as many "
            "members as ranks (num_members= / num_chains=), or fewer ranks (--nproc_per_node)"
        )
    q, extra = divmod(num_chains, k)
    start = r * q + min(r, extra)
    return slice(start, start + q + (r < extra))


@contextlib.contextmanager
def rank_local():
    """Run the block on this rank alone: trainers inside do not split batches or all-reduce.

    Example:
        >>> with data_parallel(), rank_local():
        ...     in_context()
        False
    """
    token = _ACTIVE.set(False)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (any picklable object), in rank order, on every rank.

    Example (one process):
        >>> all_gather({"a": 1})
        [{'a': 1}]
    """
    if not is_active():
        return [obj]
    # As dist.all_gather_object (pickle, all_gather of the sizes, then of the padded bytes), but
    # with async collectives waited on under the timeout. The bytes come from this job's ranks.
    device = _collective_device()
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    size = torch.tensor([len(data)], device=device)
    _run("all_gather", lambda: dist.all_gather(sizes, size, async_op=True))
    longest = int(max(int(n.item()) for n in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: len(data)] = data.to(padded.device)
    out = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    _run("all_gather", lambda: dist.all_gather(out, padded, async_op=True))
    parts: list[Any] = [pickle.loads(o[: int(n.item())].cpu().numpy().tobytes()) for o, n in zip(out, sizes)]
    return parts


def gather_chains(obj: T) -> T:
    """Concatenate every rank's per-chain results (tensors ``[chains, ...]``, dicts / tuples /
    dataclasses of them, or lists of per-chain items; ``None`` for no chains) on every rank.

    Example (one process):
        >>> import torch
        >>> gather_chains({"w": torch.zeros(2, 5)})["w"].shape
        torch.Size([2, 5])
    """
    if not is_active():
        return obj
    return _concat([p for p in all_gather(obj) if p is not None])


def _concat(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [item for p in parts for item in p]
    if isinstance(first, tuple):
        return type(first)(_concat(list(items)) for items in zip(*parts))
    if dataclasses.is_dataclass(first):
        fields = {f.name: _concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        return dataclasses.replace(first, **fields)
    raise TypeError(f"cannot gather chains of a {type(first).__name__}; wrap per-chain items in a list")


def mean_over_chains(values: list[float], num_local: int) -> list[float]:
    """Per-step means over this rank's ``num_local`` chains -> means over all chains.

    Example (one process):
        >>> mean_over_chains([1.0, 2.0], 3)
        [1.0, 2.0]
    """
    if not is_active():
        return values
    parts = [(v, m) for v, m in all_gather((list(values), num_local)) if m > 0]
    total = sum(m for _, m in parts)
    return [sum(v[t] * m for v, m in parts) / total for t in range(len(parts[0][0]))]


def map_chains(run: Callable[[int, torch.Generator], T], num_chains: int, generator: torch.Generator) -> T:
    """Run chains one by one, spread over the ranks (:func:`chain_slice`, under :func:`rank_local`),
    and gather their results (leading chain axis of length 1 each) in chain order.

    Chain ``c`` runs ``run(c, gen_c)`` with its own generator and torch's global RNG seeded
    from ``generator``'s ``c``-th seeds, so any number of ranks gives the same chains. A single
    chain runs on every rank with the context left on (data-parallel gradients).

    Example (one process, two chains):
        >>> import torch
        >>> out = map_chains(lambda c, g: torch.rand(1, 3, generator=g), 2, torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([2, 3])
    """
    seeds = torch.randint(0, 2**62, (num_chains, 2), generator=generator, device=generator.device).tolist()

    def one(c: int):
        with torch.random.fork_rng(devices=rng_devices()):
            torch.manual_seed(seeds[c][1])
            return run(c, torch.Generator(generator.device).manual_seed(seeds[c][0]))

    if num_chains == 1:
        return one(0)
    mine = range(num_chains)[chain_slice(num_chains)]
    with rank_local():
        parts = [one(c) for c in mine]
    local = _concat(parts) if parts else None
    return gather_chains(local)


def run_batched_chains(
    run: Callable[[torch.Tensor, torch.Generator], T], z0: torch.Tensor, generator: torch.Generator
) -> T:
    """``run(z0, generator)`` for a sampler that steps all chains ``z0 [C, D]`` together; inside a
    distributed context the chains run one at a time through :func:`map_chains`.

    Example (one process):
        >>> import torch
        >>> run_batched_chains(lambda z, g: z + 1, torch.zeros(2, 3), torch.Generator()).shape
        torch.Size([2, 3])
    """
    if in_context():
        return map_chains(lambda c, g: run(z0[c : c + 1], g), len(z0), generator)
    return run(z0, generator)
