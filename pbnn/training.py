"""The minibatch trainer shared by the optimisation-based backends (SVI, MAP, ...).

It owns three things: reproducible seeding that does not disturb the caller's RNG,
epoch-wise minibatch index streams, and the step loop with a tqdm progress bar and a
clear error when the loss becomes NaN.

Example:
    >>> import torch
    >>> from pbnn.training import batch_indices
    >>> it = batch_indices(10, 4, torch.Generator().manual_seed(0))
    >>> [len(next(it)) for _ in range(4)]
    [4, 4, 2, 4]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

__all__ = ["seeded", "batch_indices", "resolve_batch_size", "optimise", "FULL_BATCH_LIMIT"]

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


def optimise(
    step: Callable[[torch.Tensor | None], float],
    num_steps: int,
    n: int,
    batch_size: int | None,
    *,
    desc: str,
    progress: bool = True,
    loss_name: str = "loss",
) -> list[float]:
    """Call ``step(indices)`` ``num_steps`` times (``indices`` None = full batch); return losses."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    batches = batch_indices(n, batch_size, gen) if batch_size else None
    losses: list[float] = []
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, leave=False)
    for t in bar:
        loss = float(step(next(batches) if batches else None))
        if not math.isfinite(loss):
            raise ValueError(
                f"{desc}: the {loss_name} became {loss} at step {t}; lower the learning rate "
                "(lr=...), standardise x and y, or check the prior and likelihood scales"
            )
        losses.append(loss)
        if t % 50 == 0 or t == num_steps - 1:
            bar.set_postfix({loss_name: f"{loss:.4g}"})
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
) -> list[float]:
    """Minimise ``loss_fn(indices)`` over ``params`` with Adam, the same schedule as
    :func:`run_svi` (lr decays 10x over the run, gradient norm clipped at 10), in pure torch.
    Losses are reported per data point when ``per_point``."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / num_steps))

    def step(idx):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        return loss.item() / (n if per_point else 1)

    return optimise(step, num_steps, n, batch_size, desc=desc, progress=progress, loss_name=loss_name)


def fitted_params(guide_prefix: str) -> dict[str, torch.Tensor]:
    """The model's own ``pyro.param`` values in the current scope (guide parameters excluded)."""
    import pyro

    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys() if not k.startswith(guide_prefix + ".")}
