"""The optimisation engine: one loop under every optimiser-driven fit.

MAP, SVI, Laplace's MAP, every MAP warm start, deep ensembles, SWA / SWAG / MultiSWAG, FGE
and MC dropout all train through :func:`optimise`, which owns the optimiser (Adam, or SGD
with momentum, over one point or ``M`` points at once: ``points=M`` clips each point's
gradient on its own, so this equals ``M`` separate runs), the learning-rate schedule,
minibatches as a pure function of the step (:class:`BatchSchedule`, so a resumed run draws the
same batches) or read from a DataLoader as it is (:class:`LoaderBatches`), ``accumulate``,
data-parallel gradients, atomic checkpoints (write, then rename) and resume
(``docs/distributed.md``), the progress bar, and an error with advice when the loss becomes
NaN or inf. With ``accumulate`` the torch RNG is rewound before each micro-batch, so a random
draw in the loss is shared.

:func:`fit_map` (the one MAP fit) and :func:`fit_points` (``M`` independent points on a
per-point log joint) sit on top; :func:`run_svi` adapts Pyro's SVI (hand-written models) to
the same loop.

Example:
    >>> import torch
    >>> w = torch.zeros(2, requires_grad=True)
    >>> losses = optimise([w], lambda idx: ((w - torch.tensor([1.0, -1.0])) ** 2).sum(), num_steps=300,
    ...                   lr=decay(0.1, 300), n=1, progress=False)
    >>> [round(v, 2) for v in w.tolist()]
    [1.0, -1.0]
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import operator
import os
import tempfile
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pbnn.core.data import Batch, LoaderData
from pbnn.core.options import positive_int
from pbnn.engine import distributed

__all__ = [
    "seeded",
    "batch_indices",
    "BatchSchedule",
    "LoaderBatches",
    "resolve_batch_size",
    "sgd_batch_size",
    "decay",
    "optimise",
    "fit_map",
    "fit_points",
    "map_log_joint",
    "initial_points",
    "run_svi",
    "fitted_params",
    "FULL_BATCH_LIMIT",
    "check_momentum",
    "atomic_save",
    "data_fingerprint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]

# Data sets up to this size are fitted full-batch by default; larger ones in minibatches.
FULL_BATCH_LIMIT = 2048
DEFAULT_BATCH_SIZE = 256
OPTIMIZERS = ("adam", "sgd")
# Checkpoint files: {"format": CHECKPOINT_FORMAT, "version": ..., "fingerprint": {...}, "params",
# "optimizer", "rng", "step", "losses", "batch_seed"}: tensors and plain data only.
CHECKPOINT_FORMAT = "pbnn.checkpoint"
CHECKPOINT_VERSION = 2
_HASHED = 1 << 20  # the data hash reads at most this many evenly spaced numbers per tensor


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run with torch's RNG seeded, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` (``bytes`` as they are, anything else through ``torch.save``) to ``path``
    so that ``path`` always holds either its old or its new content, never a torn file.

    The bytes go to a temporary file in the same folder (``.<name>.<random>.tmp``), are
    flushed and fsynced, then ``os.replace`` renames it over ``path`` (atomic on POSIX and
    Windows within one file system) and the folder is fsynced where the OS allows. A process
    killed before the rename leaves the old file intact (and at worst a stray ``.tmp`` file).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, (bytes, bytearray, memoryview)):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _tensor_digest(t: torch.Tensor) -> str:
    flat = t.detach().cpu().reshape(-1)
    step = max(1, flat.numel() // _HASHED)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{str(t.dtype)}{tuple(t.shape)}".encode())
    h.update(flat[::step].double().numpy().tobytes())
    h.update(repr(float(flat.double().sum())).encode())  # every number counts, if only through the sum
    return h.hexdigest()


def data_fingerprint(data) -> dict:
    """Plain-data fingerprint of a :class:`pbnn.data.Data`: the shapes of ``x`` and ``y`` and a
    cheap hash (at most ~1M evenly spaced numbers of each, and their sum), for checkpoints.
    For a loader's :class:`pbnn.data.LoaderData`: its number of rows and its first batch."""
    if isinstance(data, LoaderData):
        first = data.first
        return {
            "data shape": ["loader", len(data), list(first.x.shape), list(first.y.shape)],
            "data hash": _tensor_digest(first.x) + _tensor_digest(first.y),
        }
    return {
        "data shape": [list(data.x.shape), list(data.y.shape)],
        "data hash": _tensor_digest(data.x) + _tensor_digest(data.y),
    }


def load_checkpoint(path: str | os.PathLike, fingerprint: dict) -> dict | None:
    """The checkpoint at ``path`` (None when there is none), checked against ``fingerprint``.

    Loaded with ``torch.load(weights_only=True)``, so a file cannot run code. Raises a
    ValueError naming the cause and how to start afresh when the file is not a pbnn checkpoint
    of this version (crafted, corrupt or from an older pbnn) or belongs to another fit (each
    entry of the fingerprint that differs, with both values).
    """
    if not os.path.exists(path):
        return None
    afresh = f"to start afresh, delete {os.fspath(path)!r} or pass another checkpoint_path"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"{os.fspath(path)!r} is not a pbnn checkpoint that holds only tensors and plain data "
            f"(crafted, corrupt, or written by an older pbnn; loading it stopped with {type(e).__name__}); "
            f"{afresh}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a pbnn checkpoint; {afresh}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} is a pbnn checkpoint of format version {state.get('version')!r}, "
            f"this pbnn reads version {CHECKPOINT_VERSION}; {afresh}"
        )
    theirs = state.get("fingerprint", {})
    differs = [
        f"{k}: checkpoint {theirs.get(k, '(absent)')!r}, this fit {fingerprint.get(k, '(absent)')!r}"
        for k in sorted(set(theirs) | set(fingerprint))
        if theirs.get(k, "(absent)") != fingerprint.get(k, "(absent)")
    ]
    if differs:
        raise ValueError(
            f"the checkpoint {os.fspath(path)!r} belongs to another fit ({'; '.join(differs)}); "
            f"resuming it would be wrong, {afresh}"
        )
    return state


def resolve_batch_size(batch_size: int | None, n: int) -> int | None:
    """``None`` means full batch for ``n <= FULL_BATCH_LIMIT``, else ``DEFAULT_BATCH_SIZE``.

    Returns None for full-batch training."""
    if batch_size is None:
        return None if n <= FULL_BATCH_LIMIT else DEFAULT_BATCH_SIZE
    positive_int("batch_size", batch_size)
    return None if batch_size >= n else batch_size


def sgd_batch_size(batch_size: int | None, n: int) -> int | None:
    """SGD needs gradient noise to explore: by default ten minibatches per epoch (at most 256 points)."""
    if batch_size is None:
        return None if n < 10 else min(256, math.ceil(n / 10))
    return resolve_batch_size(batch_size, n)


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of minibatch indices: a fresh permutation each epoch, the last batch short.

    Example:
        >>> it = batch_indices(10, 4, torch.Generator().manual_seed(0))
        >>> [len(next(it)) for _ in range(4)]
        [4, 4, 2, 4]
    """
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


class BatchSchedule:
    """Minibatch indices as a pure function of the step number (so a resumed run draws the
    same batches): epoch ``e`` is a permutation seeded by ``seed + e``, split in order."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._batches = -1, ()

    def __call__(self, step: int) -> torch.Tensor:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch, self._batches = epoch, perm.split(self.batch_size)
        return self._batches[step % self.per_epoch]


def _peek_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator`` (None: torch's global RNG) without moving it."""
    if generator is not None:
        return int(torch.randint(0, 2**62, (), generator=torch.Generator().set_state(generator.get_state())))
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, ()).item())


class LoaderBatches:
    """The batches of a loader (:class:`pbnn.data.LoaderData`) as steps consume them: one pass
    after another (a ``DistributedSampler``'s ``set_epoch`` called with the pass number).

    Every read runs on its own torch RNG stream seeded by ``seed``: the loader's shuffling and
    its workers' seeds are reproducible, and never move the fit's random stream (so a loader
    that yields all rows in one batch gives the numbers of the full-batch tensor fit).
    :meth:`state` (the stream at the start of the current pass and the number of batches read
    in it) and :meth:`restore` make a resumed fit read the same batches, as long as the
    loader's randomness comes from torch's RNG (or its own ``generator=``).

    Example:
        >>> import torch, pbnn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = pbnn.BNN(torch.nn.Linear(1, 1))
        >>> data = pbnn.data.validate(model, DataLoader(TensorDataset(torch.randn(5, 1), torch.randn(5)), batch_size=2))
        >>> batches = LoaderBatches(data, seed=0)
        >>> [len(batches(t)) for t in range(4)]
        [2, 2, 1, 2]
    """

    def __init__(self, data: LoaderData, seed: int) -> None:
        self.data = data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._rng = torch.get_rng_state()
        self._gen = getattr(data.source, "generator", None)
        self._epoch_fn = getattr(getattr(data.source, "sampler", None), "set_epoch", None)
        self._it, self._pass, self._read, self._skip = None, -1, 0, 0
        self._pass_state: dict = {}

    def __call__(self, step: int | None = None) -> Batch:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            batch = self._next()
            self._rng = torch.get_rng_state()
        return batch

    def _next(self) -> Batch:
        while True:
            if self._it is None:
                self._pass += 1
                self._pass_state = {
                    "rng": torch.get_rng_state(),
                    "generator": self._gen.get_state() if self._gen is not None else None,
                    "pass": self._pass,
                }
                if self._epoch_fn is not None:
                    self._epoch_fn(self._pass)
                self._it, self._read = self.data.batches(), 0
            for b in self._it:
                self._read += 1
                if self._skip:  # resuming: the batches read before the checkpoint
                    self._skip -= 1
                    continue
                return b
            self._it = None
            if self._read == 0:
                raise ValueError("the loader yielded no batches in a pass; it must start afresh on each iter()")

    def state(self) -> dict:
        """Where the current pass began (RNG states, pass number) and the batches read in it."""
        return {**self._pass_state, "read": self._read}

    def restore(self, state: dict) -> None:
        """Continue as the run that wrote ``state`` did (the pass re-read up to its position)."""
        self._rng, self._pass, self._skip, self._it = state["rng"], state["pass"] - 1, state["read"], None
        if self._gen is not None and state["generator"] is not None:
            self._gen.set_state(state["generator"])


def decay(lr: float, num_steps: int, factor: float = 0.1) -> Callable[[int], float]:
    """Schedule: ``lr`` decaying exponentially by ``factor`` over ``num_steps`` steps.

    Computed as ``torch.optim.lr_scheduler.ExponentialLR`` does (one multiplication by
    ``factor ** (1 / num_steps)`` per step), so the numbers are those of every earlier pbnn
    fit that used it.

    Example:
        >>> s = decay(1.0, 2)
        >>> round(s(0), 4), round(s(1), 4), round(s(2), 4)
        (1.0, 0.3162, 0.1)
    """
    gamma = factor ** (1.0 / num_steps)
    lrs = list(itertools.accumulate(itertools.repeat(gamma, num_steps), operator.mul, initial=lr))
    return lambda t: lrs[min(t, num_steps)]


def _loop(
    step,
    num_steps,
    n,
    batch_size,
    *,
    desc,
    progress,
    loss_name,
    start=0,
    losses=(),
    seed=None,
    after=None,
    batches=None,
):
    """Call ``step(t, indices)`` for ``t = start .. num_steps - 1`` (indices None: full batch;
    ``batches``: a source of batches such as :class:`LoaderBatches`, instead of
    :class:`BatchSchedule`) under one progress bar, stop with advice on a NaN / inf loss;
    return all losses."""
    if batches is None and batch_size:
        batches = BatchSchedule(n, batch_size, seed)
    losses = list(losses)
    bar = tqdm(range(start, num_steps), desc=desc, disable=not progress, leave=False, initial=start, total=num_steps)
    advice = "lower the learning rate (lr=...), standardise x and y, or check the prior and likelihood scales"
    for t in bar:
        try:
            loss = float(step(t, batches(t) if batches else None))
        except ValueError as err:  # a distribution built from diverged (NaN) parameters
            if "Expected parameter" not in str(err):
                raise
            raise ValueError(f"{desc}: the parameters became NaN or inf at step {t}; {advice}") from None
        if not math.isfinite(loss):
            raise ValueError(f"{desc}: the {loss_name} became {loss} at step {t}; {advice}")
        losses.append(loss)
        if t % 50 == 0 or t == num_steps - 1:
            bar.set_postfix({loss_name: f"{loss:.4g}"})
        if after is not None:
            after(t, losses)
    return losses


def _batch_seed(batch_size: int | None) -> int | None:
    return int(torch.randint(0, 2**62, ()).item()) if batch_size else None


def optimise(
    params: list[torch.Tensor],
    loss_fn: Callable[[torch.Tensor | None], torch.Tensor],
    *,
    num_steps: int,
    lr: float | Callable[[int], float],
    n: int,
    batch_size: int | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    points: int | None = None,
    clip_norm: float | None = 10.0,
    accumulate: int = 1,
    data_parallel: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    fingerprint: dict | None = None,
    data=None,
    on_step: Callable[[int], None] | None = None,
    scale: float = 1.0,
    desc: str = "optimise",
    progress: bool = True,
    loss_name: str = "loss",
) -> list[float]:
    """Minimise ``loss_fn(indices)`` over ``params``; return the losses divided by ``scale``.

    Args:
        params: leaf tensors to optimise (with ``points=M``: each with a leading ``[M]`` dim).
        loss_fn: the loss on the rows ``indices`` of ``n`` (None: all rows; a
            :class:`pbnn.data.Batch` when ``data`` is a loader's); it must scale the likelihood
            of a minibatch by ``n / len(indices)`` (as :class:`pbnn.potential.Potential` does),
            so micro-batches and ranks can split it.
        num_steps, lr: optimiser steps and learning rate (a number or ``step -> lr``).
        batch_size: minibatch size (None: full batch). Ignored when ``data`` is a
            :class:`pbnn.data.LoaderData`: each step then takes the loader's next batch
            (:class:`LoaderBatches`; under data-parallel training each rank reads its
            ``DistributedSampler`` shard).
        optimizer, momentum: ``"adam"``, or ``"sgd"`` with ``momentum``.
        points: None: clip the gradient norm of all ``params`` together; ``M``: clip each
            point's gradient (all its tensors together) on its own.
        clip_norm: gradient-norm clip (None: none).
        accumulate: micro-batches per minibatch (same update, less memory; module docstring).
        data_parallel: inside :func:`pbnn.engine.distributed.data_parallel`, split every
            batch over the ranks (False: every rank trains its own points on all its rows).
        checkpoint_path, checkpoint_every: checkpoint and resume (module docstring).
        fingerprint, data: what a checkpoint belongs to, besides what this loop knows (its
            ``desc``, parameter shapes, ``n``, batch size, optimiser options, learning rates
            at the first and last step, number of steps, clipping, ``accumulate``, ``points``,
            ranks): plain data from the caller (method, seed, ...) and the training
            :class:`pbnn.data.Data` (its shapes and a cheap hash, :func:`data_fingerprint`).
            Resuming a checkpoint whose fingerprint differs is a ValueError that names each
            difference (:func:`load_checkpoint`).
        on_step: called with the step number after each optimiser step.
    """
    positive_int("num_steps", num_steps)
    positive_int("accumulate", accumulate)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if (checkpoint_path is None) != (checkpoint_every is None):
        raise ValueError("pass both checkpoint_path and checkpoint_every (or neither)")
    ranks, me = (distributed.world_size(), distributed.rank()) if data_parallel else (1, 0)
    schedule = lr if callable(lr) else (lambda t: lr)
    opt = (
        torch.optim.Adam(params, lr=schedule(0))
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=schedule(0), momentum=momentum)
    )
    split = ranks > 1 or accumulate > 1

    def step(t, idx):
        for group in opt.param_groups:
            group["lr"] = schedule(t)
        opt.zero_grad(set_to_none=True)
        if not split:
            loss = loss_fn(idx)
            loss.backward()
            total = loss.detach()
        else:
            if isinstance(idx, Batch):  # a DistributedSampler already gave each rank an equal share
                share, whole = idx, len(idx) * ranks
            else:
                idx = torch.arange(n) if idx is None else idx
                share, whole = idx.tensor_split(ranks)[me], len(idx)
            rng = torch.get_rng_state()
            total = torch.zeros(())
            for micro in share.tensor_split(accumulate):
                if len(micro) == 0:
                    continue
                torch.set_rng_state(rng)  # the same random draw for every micro-batch and rank
                loss = loss_fn(micro) * (len(micro) / whole)
                loss.backward()
                total = total + loss.detach()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            distributed.allreduce_sum_([*grads, total.reshape(1)] if ranks > 1 else [])
            for p, g in zip(params, grads):
                p.grad = g
        if clip_norm is not None:
            _clip(params, points, clip_norm)
        opt.step()
        if on_step is not None:
            on_step(t)
        return total.item() / scale

    start, losses, after = 0, [], None
    loader = None
    if isinstance(data, LoaderData):  # the loader's own batches; its seed leaves the fit's RNG as it is
        distributed.check_loader(data.sharded, split=ranks > 1)
        loader, batch_size = LoaderBatches(data, _peek_seed()), None
    seed = _batch_seed(batch_size)
    if checkpoint_path is not None:
        if not data_parallel and distributed.world_size() > 1:  # ranks train different points
            checkpoint_path = f"{os.fspath(checkpoint_path)}.rank{distributed.rank()}"
        fp = {
            "loop": desc,
            "parameter shapes": [list(p.shape) for p in params],
            "n": n,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "momentum": momentum if optimizer == "sgd" else None,
            "lr (first, last step)": [float(schedule(0)), float(schedule(num_steps - 1))],
            "num_steps": num_steps,
            "clip_norm": clip_norm,
            "accumulate": accumulate,
            "points": points,
            "ranks": ranks,
            **(data_fingerprint(data) if data is not None else {}),
            **(fingerprint or {}),
        }
        state = load_checkpoint(checkpoint_path, fp)
        if state is not None:
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, losses, seed = state["step"] + 1, state["losses"], state["batch_seed"]
            if loader is not None:
                loader.restore(state["loader"])

        def after(t, losses):
            if ((t + 1) % checkpoint_every == 0 or t == num_steps - 1) and me == 0:
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "fingerprint": fp,
                    "params": [p.detach().clone() for p in params],
                    "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": t,
                    "losses": list(losses),
                    "batch_seed": seed,
                    **({"loader": loader.state()} if loader is not None else {}),
                }
                atomic_save(state, checkpoint_path)  # a killed job never leaves a half-written file

    if start >= num_steps:
        return losses
    return _loop(
        step,
        num_steps,
        n,
        batch_size and batch_size * ranks,
        desc=desc,
        progress=progress and me == 0,
        loss_name=loss_name,
        start=start,
        losses=losses,
        seed=seed,
        after=after,
        batches=loader,
    )


def _clip(params: list[torch.Tensor], points: int | None, max_norm: float) -> None:
    """Clip the gradient norm of all ``params`` together, or of each of ``points`` points
    (leading dim) on its own, as ``clip_grad_norm_`` would in a separate run per point."""
    if points is None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.reshape(points, -1).pow(2).sum(1) for g in grads)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.reshape((points,) + (1,) * (g.dim() - 1)))


# ---------------------------------------------------------------------------- MAP
def fit_map(
    potential,
    z0: torch.Tensor | None = None,
    *,
    num_steps: int,
    lr: float = 0.01,
    batch_size: int | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    train_fixed: bool = True,
    moving: torch.Tensor | None = None,
    jacobian: bool = False,
    accumulate: int = 1,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    fingerprint: dict | None = None,
    desc: str = "MAP",
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    """The one MAP fit: Adam on ``-log joint`` of a :class:`pbnn.potential.Potential`.

    Adam with ``lr`` decaying 10x over the run (:func:`decay`), the gradient norm of the
    summed log joint clipped at 10, data-parallel inside ``distributed.data_parallel``.

    Args:
        potential: the model's potential.
        z0: start ``[D]``, or ``[C, D]`` for ``C`` points optimised together, each on its own
            log joint (their gradient is clipped jointly, as the chains' warm start always
            did; default: ``potential.initial_z()``).
        num_steps, lr, batch_size: Adam steps, learning rate and minibatch size (None: full batch).
        fixed: point-estimate parameters (default ``potential.fixed``); optimised too
            when ``train_fixed``.
        moving: optional boolean mask ``[D]`` of the coordinates of ``z`` that move (the
            others keep their start values).
        jacobian: maximise the density of the unconstrained ``z`` (True, what a sampler
            targets) or of the constrained values (False: the MAP as Pyro's ``AutoDelta``
            defines it).
        accumulate, checkpoint_path, checkpoint_every, fingerprint: as :func:`optimise` (the
            checkpoint also records the potential's data).

    Returns:
        ``(z, fixed, losses)``, detached, ``z`` shaped like ``z0``; losses per data point.

    Example:
        >>> import torch, pbnn
        >>> x = torch.randn(40, 1); y = 3 * x[:, 0]
        >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
        >>> pot = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
        >>> z, _, _ = fit_map(pot, num_steps=500, lr=0.05)
        >>> round(float(z[0]), 1)
        3.0
    """
    start = potential.initial_z() if z0 is None else z0
    batched = start.dim() == 2
    if batched and not jacobian:
        raise ValueError("fit_map of several points optimises the unconstrained density: pass jacobian=True")
    z = start.detach().clone().requires_grad_(True)
    fixed = potential.fixed if fixed is None else fixed
    fixed = {k: v.detach().clone().requires_grad_(train_fixed) for k, v in fixed.items()}
    if moving is not None:
        keep = ~moving.to(torch.bool)
        z.register_hook(lambda g: g.masked_fill(keep, 0.0))

    def loss_fn(idx):
        if batched:
            return -potential.log_joint_batch(z, idx, fixed).sum()
        return -potential.log_joint(z, idx, fixed, jacobian=jacobian)

    n = len(potential.data) * (start.shape[0] if batched else 1)
    losses = optimise(
        [z, *(fixed.values() if train_fixed else ())],
        loss_fn,
        num_steps=num_steps,
        lr=decay(lr, num_steps),
        n=len(potential.data),
        batch_size=batch_size,
        accumulate=accumulate,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
        fingerprint=fingerprint,
        data=potential.data,
        scale=n,
        desc=desc,
        progress=progress,
        loss_name="-log joint/N",
    )
    return z.detach(), {k: v.detach() for k, v in fixed.items()}, losses


# ---------------------------------------------------------------------------- M independent points
def map_log_joint(
    potential,
    z: torch.Tensor,
    idx: torch.Tensor | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    *,
    weights: torch.Tensor | None = None,
    prior_weights: dict[str, float] | None = None,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``log p(theta(z)) + (N / B) sum_i w_i log p(y_i | x_i, theta(z))`` of a BNN, no Jacobian.

    With no options this equals ``potential.log_joint(z, idx, fixed, jacobian=False)`` up to
    float rounding (the prior is summed per tensor here); for a hand-written Pyro model it is
    exactly that (the options need a BNN).

    Args:
        weights: per-datum likelihood weights ``[N]`` (bootstrap counts), or None.
        prior_weights: factor on the log prior of single weight tensors (MC dropout's
            ``p_keep``: the KL of a dropout layer is ``p_keep`` times the L2 term).
        transform: maps the weight values before the likelihood (DropConnect masks).
    """
    if potential.kind != "bnn":  # a hand-written Pyro model: its own log joint, no per-datum options
        if weights is not None or prior_weights or transform is not None:
            raise ValueError("likelihood weights, prior weights and weight transforms need a pbnn.BNN model")
        return potential.log_joint(z, idx, fixed, jacobian=False)
    model = potential.model
    sample, _ = potential.unpack(z)
    if weights is not None and isinstance(idx, Batch):
        raise ValueError(
            "per-datum weights (bootstrap=True) need row indices, which data from a loader has not: "
            "pass tensors x, y, or bootstrap=False"
        )
    x, y, scale = potential.data.rows(idx)
    ll = model.log_likelihood(transform(sample) if transform is not None else sample, x, y, fixed)
    if weights is not None:
        ll = ll * (weights if idx is None else weights[idx])
    if not prior_weights:
        lp = model.log_prior(sample, potential.out_dim)
    else:
        hyper = {h: sample[h] for h in model.hyper_names}
        lp = model.prior.hyper_log_prob(hyper)
        for n in model.bayesian_names:
            lp = lp + prior_weights.get(n, 1.0) * model.prior.log_prob(n, sample[n], hyper)
        for n, d in model.noise_sites(potential.out_dim).items():
            lp = lp + d.log_prob(sample[n])
    return lp + scale * ll.sum()


def initial_points(potential, seeds: list[int | None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One starting point per seed: ``z0`` ``[M, D]`` and deterministic parameters ``{name: [M, ...]}``.

    A seed of None keeps the network's own initialisation; otherwise every submodule with
    ``reset_parameters`` (Linear, Conv, BatchNorm, ...) is re-initialised under that seed,
    so members start independently. Noise sites start at their prior median. For a hand-written
    Pyro model a seed draws every coordinate of ``z`` from ``Uniform(-2, 2)`` in the
    unconstrained space (Pyro's ``init_to_uniform``); its ``pyro.param`` values start as traced.
    """
    if potential.kind != "bnn":
        zs, like = [], potential.initial_z()  # dtype and device of the model's sites
        for seed in seeds:
            with seeded(seed):
                zs.append(like.clone() if seed is None else 4 * torch.rand(like.shape, dtype=like.dtype) - 2)
        zs = [z.to(like.device) for z in zs]
        return torch.stack(zs), {k: v.expand((len(seeds),) + v.shape).clone() for k, v in potential.fixed.items()}
    model = potential.model
    base, _ = potential.unpack(potential.initial_z())
    zs, fixed = [], {n: [] for n in model.deterministic_names}
    for seed in seeds:
        net = model.net
        if seed is not None:
            net = copy.deepcopy(model.net)
            with seeded(seed):
                for mod in net.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
        values = {n: p.detach().clone() for n, p in net.named_parameters()}
        zs.append(potential.pack({**base, **{n: values[n] for n in model.bayesian_names}}))
        for n in model.deterministic_names:
            fixed[n].append(values[n])
    return torch.stack(zs), {n: torch.stack(v) for n, v in fixed.items()}


def fit_points(
    potential,
    z0: torch.Tensor,
    fixed0: dict[str, torch.Tensor] | None = None,
    *,
    num_steps: int,
    lr: float | Callable[[int], float],
    log_joint: Callable[..., torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    train_fixed: bool = True,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    """Maximise the log joint of ``M`` independent points ``z0`` ``[M, D]`` of a model (a BNN or a
    hand-written Pyro model).

    Args:
        potential: the BNN's potential (fixes the packing of ``z``).
        z0, fixed0: starting points and deterministic parameters (``{name: [M, ...]}``).
        num_steps, lr: optimiser steps and learning rate (a number or ``step -> lr``).
        log_joint: ``f(z, idx, fixed, weights) -> scalar`` for one point (default
            :func:`map_log_joint`); it may use torch's RNG (dropout).
        weights: per-point likelihood weights ``[M, N]`` passed to ``log_joint``.
        train_fixed: also optimise the deterministic parameters (else hold them).
        on_step: ``on_step(step, z)`` after each step with the detached ``z`` ``[M, D]``.
        options: passed to :func:`optimise` (``optimizer``, ``momentum``, ``batch_size``,
            ``accumulate``, checkpoints, ``desc``, ``progress``). The loss is ``-log joint / N``
            per point, each point's gradient clipped at norm 10, not data-parallel (ranks
            train different points).

    Returns:
        ``(z [M, D], fixed {name: [M, ...]}, losses)``, losses = mean over points of
        ``-log joint / N``.
    """
    n, num = len(potential.data), z0.shape[0]
    z = z0.detach().clone().requires_grad_(True)
    fixed = {k: v.detach().clone().requires_grad_(train_fixed) for k, v in (fixed0 or {}).items()}
    if log_joint is None:

        def log_joint(zz, idx, fx, w):
            return map_log_joint(potential, zz, idx, fx, weights=w)

    def loss_fn(idx):  # points are independent, so one backward serves all
        per_point = [
            log_joint(z[m], idx, {k: v[m] for k, v in fixed.items()}, None if weights is None else weights[m])
            for m in range(num)
        ]
        return -torch.stack(per_point).sum() / n

    losses = optimise(
        [z, *fixed.values()] if train_fixed else [z],
        loss_fn,
        num_steps=num_steps,
        lr=lr,
        n=n,
        points=num,
        data_parallel=False,
        on_step=on_step and (lambda t: on_step(t, z.detach())),
        data=potential.data,
        scale=num,
        loss_name="-log joint/N",
        **options,
    )
    return z.detach(), {k: v.detach() for k, v in fixed.items()}, losses


# ---------------------------------------------------------------------------- Pyro's SVI
def run_svi(
    model,
    guide,
    data,
    *,
    num_steps: int,
    lr: float,
    batch_size: int | None,
    num_particles: int = 1,
    accumulate: int = 1,
    checkpoint_path: str | None = None,
    desc: str,
    progress: bool = True,
) -> list[float]:
    """Maximise the ELBO of ``guide`` for a hand-written Pyro model with Pyro's SVI, driven by
    the engine's loop (batches, bar, NaN check).

    ClippedAdam (lr decaying 10x over the run, clip norm 10), ``Trace_ELBO``. Must run inside
    a param-store scope, so fits never share parameters. Minibatches go through the model's
    ``subsample=`` argument, so the ``"data"`` plate scales the log-likelihood by N / B.
    Returns the losses per data point (negative ELBO / N).
    """
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import ClippedAdam

    if accumulate > 1 or checkpoint_path or distributed.is_active():
        raise ValueError(
            "gradient accumulation, checkpoints and data-parallel training need a pbnn.BNN model; "
            "hand-written Pyro models are trained by pyro.infer.SVI in one process"
        )
    positive_int("num_steps", num_steps)
    optim = ClippedAdam({"lr": lr, "lrd": 0.1 ** (1.0 / num_steps), "clip_norm": 10.0})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=num_particles))
    n = len(data)

    def step(t, idx):
        return svi.step(data.x, data.y, **({} if idx is None else {"subsample": idx})) / n

    seed = _batch_seed(batch_size)
    return _loop(step, num_steps, n, batch_size, desc=desc, progress=progress, loss_name="-elbo/N", seed=seed)


def fitted_params(guide_prefix: str) -> dict[str, torch.Tensor]:
    """The model's own ``pyro.param`` values in the current scope (guide parameters excluded)."""
    import pyro

    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys() if not k.startswith(guide_prefix + ".")}


def check_momentum(name: str, value) -> float:
    """Option check of an SGD momentum: a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return float(value)
