"""The minibatch trainer shared by the optimisation-based backends (SVI, MAP, ...).

It owns three things: reproducible seeding that does not disturb the caller's RNG,
epoch-wise minibatch index streams, and the step loop with a tqdm progress bar and a
clear error when the loss becomes NaN.

Example:
    >>> import torch
    >>> from pbnn.engine.training import batch_indices
    >>> it = batch_indices(10, 4, torch.Generator().manual_seed(0))
    >>> [len(next(it)) for _ in range(4)]
    [4, 4, 2, 4]
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

__all__ = [
    "seeded",
    "batch_indices",
    "BatchSchedule",
    "resolve_batch_size",
    "optimise",
    "run_adam",
    "run_svi",
    "FULL_BATCH_LIMIT",
    "fit_map",
]

# Data sets up to this size are fitted full-batch by default; larger ones in minibatches.
FULL_BATCH_LIMIT = 2048
DEFAULT_BATCH_SIZE = 256


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run with torch's RNG seeded, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resolve_batch_size(batch_size: int | None, n: int) -> int | None:
    """``None`` means full batch for ``n <= FULL_BATCH_LIMIT``, else ``DEFAULT_BATCH_SIZE``.

    Returns None for full-batch training."""
    if batch_size is None:
        return None if n <= FULL_BATCH_LIMIT else DEFAULT_BATCH_SIZE
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return None if batch_size >= n else batch_size


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of minibatch indices: a fresh permutation each epoch, the last batch short."""
    while True:
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch_size)


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


def optimise(
    step: Callable[[torch.Tensor | None], float],
    num_steps: int,
    n: int,
    batch_size: int | None,
    *,
    desc: str,
    progress: bool = True,
    loss_name: str = "loss",
    start: int = 0,
    losses: list[float] | None = None,
    after_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Call ``step(indices)`` for steps ``start .. num_steps - 1`` (``indices`` None = full
    batch); return all losses. ``after_step(t, losses)`` runs after each step (checkpoints)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    schedule = BatchSchedule(n, batch_size, int(torch.randint(0, 2**62, ()).item())) if batch_size else None
    losses = list(losses or [])
    bar = tqdm(range(start, num_steps), desc=desc, disable=not progress, leave=False, initial=start, total=num_steps)
    for t in bar:
        loss = float(step(schedule(t) if schedule else None))
        if not math.isfinite(loss):
            raise ValueError(
                f"{desc}: the {loss_name} became {loss} at step {t}; lower the learning rate "
                "(lr=...), standardise x and y, or check the prior and likelihood scales"
            )
        losses.append(loss)
        if t % 50 == 0 or t == num_steps - 1:
            bar.set_postfix({loss_name: f"{loss:.4g}"})
        if after_step is not None:
            after_step(t, losses)
    return losses


def run_svi(
    model,
    guide,
    data,
    *,
    num_steps: int,
    lr: float,
    batch_size: int | None,
    num_particles: int = 1,
    desc: str,
    progress: bool = True,
) -> list[float]:
    """Maximise the ELBO of ``guide`` with ClippedAdam (lr decays 10x over the run).

    Must be called inside a param-store scope (``pyro.get_param_store().scope()``), so fits
    never share parameters. Minibatches go through the model's ``subsample=`` argument, so
    the ``"data"`` plate scales the log-likelihood by N / B. Returns the losses per data
    point (negative ELBO / N).
    """
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import ClippedAdam

    optim = ClippedAdam({"lr": lr, "lrd": 0.1 ** (1.0 / num_steps), "clip_norm": 10.0})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=num_particles))
    n = len(data)

    def step(idx):
        kwargs = {} if idx is None else {"subsample": idx}
        return svi.step(data.x, data.y, **kwargs) / n

    return optimise(step, num_steps, n, batch_size, desc=desc, progress=progress, loss_name="-elbo/N")


def run_adam(
    params: list[torch.Tensor],
    loss_fn: Callable[[torch.Tensor | None], torch.Tensor],
    *,
    num_steps: int,
    lr: float,
    n: int,
    batch_size: int | None,
    desc: str,
    progress: bool = True,
    loss_name: str = "loss",
    per_point: bool = True,
    accumulate: int = 1,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
) -> list[float]:
    """Minimise ``loss_fn(indices)`` over ``params`` with Adam in pure torch.

    The schedule matches :func:`run_svi`: lr decays 10x over the run, gradient norm
    clipped at 10. Losses are reported per data point when ``per_point``.

    ``loss_fn(idx)`` must scale the likelihood of the rows ``idx`` by ``N / len(idx)``
    (as :class:`pbnn.potential.Potential` does). Then:

    * ``accumulate=k`` splits each minibatch into ``k`` micro-batches whose gradients,
      weighted by their share of the batch, add up to the gradient of the whole batch;
      the torch RNG is rewound before each micro-batch so stochastic losses (SVI's guide
      draw) use the same draw for all of them: the update equals one ``k``-times larger
      batch (``batch_size`` is the size before splitting).
    * inside :func:`pbnn.distributed.data_parallel`, each rank takes its share of a global
      batch of ``batch_size * world_size`` rows (or of the full data) and the weighted
      gradients are summed over ranks: the update one process would make on the union.
    * ``checkpoint_path`` + ``checkpoint_every``: every that many steps rank 0 writes the
      parameters, optimiser, schedule, RNG state and losses atomically; a run started with
      an existing checkpoint resumes from it and ends in the same state as an
      uninterrupted run.
    """
    from pbnn.engine import distributed

    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
    if (checkpoint_path is None) != (checkpoint_every is None):
        raise ValueError("pass both checkpoint_path and checkpoint_every (or neither)")
    ranks, me = distributed.world_size(), distributed.rank()
    global_batch = batch_size * ranks if batch_size else None
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / num_steps))
    split = ranks > 1 or accumulate > 1

    def step(idx):
        opt.zero_grad(set_to_none=True)
        if not split:
            loss = loss_fn(idx)
            loss.backward()
            total = loss.detach()
        else:
            idx = torch.arange(n) if idx is None else idx
            mine = idx.tensor_split(ranks)[me]
            rng = torch.get_rng_state()
            total = torch.zeros(())
            for micro in mine.tensor_split(accumulate):
                if len(micro) == 0:
                    continue
                torch.set_rng_state(rng)  # the same random draw for every micro-batch and rank
                loss = loss_fn(micro) * (len(micro) / len(idx))
                loss.backward()
                total = total + loss.detach()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            distributed.allreduce_sum_([*grads, total.reshape(1)] if ranks > 1 else [])
            for p, g in zip(params, grads):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        return total.item() / (n if per_point else 1)

    start, losses, after_step = 0, [], None
    if checkpoint_path is not None:
        checkpoint_every = int(checkpoint_every)
        state = _load_checkpoint(checkpoint_path)
        if state is not None:
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start, losses = state["step"] + 1, state["losses"]

        def after_step(t, losses):
            if (t + 1) % checkpoint_every == 0 or t == num_steps - 1:
                if me == 0:
                    _save_checkpoint(checkpoint_path, params, opt, sched, t, losses)

    if start >= num_steps:
        return losses
    return optimise(
        step,
        num_steps,
        n,
        global_batch,
        desc=desc,
        progress=progress and me == 0,
        loss_name=loss_name,
        start=start,
        losses=losses,
        after_step=after_step,
    )


def _save_checkpoint(path, params, opt, sched, step: int, losses: list[float]) -> None:
    state = {
        "params": [p.detach().clone() for p in params],
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
        "losses": list(losses),
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed job never leaves a half-written checkpoint


def _load_checkpoint(path) -> dict | None:
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=False)


def fitted_params(guide_prefix: str) -> dict[str, torch.Tensor]:
    """The model's own ``pyro.param`` values in the current scope (guide parameters excluded)."""
    import pyro

    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys() if not k.startswith(guide_prefix + ".")}


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
    desc: str = "MAP",
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    """The one MAP fit: Adam on ``-log joint`` of a :class:`pbnn.potential.Potential`.

    Used by the MAP backend and by every warm start (Laplace, NUTS / HMC / MH, SG-MCMC).

    Args:
        potential: the model's potential.
        z0: start ``[D]``, or ``[C, D]`` for ``C`` independent points optimised together
            (each its own log joint; default: ``potential.initial_z()``).
        num_steps, lr, batch_size: Adam steps, learning rate (decaying 10x over the run)
            and minibatch size (None: full batch).
        fixed: point-estimate parameters (default ``potential.fixed``); optimised too
            when ``train_fixed``.
        moving: optional boolean mask ``[D]`` of the coordinates of ``z`` that move (the
            others keep their start values).
        jacobian: maximise the density of the unconstrained ``z`` (True, what a sampler
            targets) or of the constrained values (False: the MAP as Pyro's ``AutoDelta``
            defines it).
        accumulate, checkpoint_path, checkpoint_every: as :func:`run_adam`.

    Returns:
        ``(z, fixed, losses)``, detached, ``z`` shaped like ``z0``.

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
    z = start.detach().clone().requires_grad_(True)
    fixed = {k: v.detach().clone().requires_grad_(train_fixed) for k, v in (potential.fixed if fixed is None else fixed).items()}
    if moving is not None:
        keep = ~moving.to(torch.bool)
        z.register_hook(lambda g: g.masked_fill(keep, 0.0))

    def loss_fn(idx):
        if batched:
            return -potential.log_joint_batch(z, idx, fixed).sum()
        return -potential.log_joint(z, idx, fixed, jacobian=jacobian)

    if batched and not jacobian:
        raise ValueError("fit_map of several points optimises the unconstrained density: pass jacobian=True")
    losses = run_adam(
        [z, *(fixed.values() if train_fixed else ())],
        loss_fn,
        num_steps=num_steps,
        lr=lr,
        n=len(potential.data) * (start.shape[0] if batched else 1),
        batch_size=batch_size,
        desc=desc,
        progress=progress,
        loss_name="-log joint/N",
        accumulate=accumulate,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
    )
    return z.detach(), {k: v.detach() for k, v in fixed.items()}, losses
