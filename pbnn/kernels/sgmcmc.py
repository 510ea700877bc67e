"""Stochastic-gradient MCMC kernels: pure update rules (:func:`sgld`, :func:`sghmc`, :func:`psgld`),
step-size schedules (plain functions of the step) and :func:`transition` (gradient steps up to
the next collection point, with the divergence guard).

Rules take the gradient of the per-datum loss ``L = -log p~(theta | D) / N`` (minibatch
likelihood scaled by ``N / B``) with learning rate ``lr`` and noise ``sqrt(2 * lr * T / N)``:
Welling & Teh's rule with ``eps = 2 * lr / N``.

Example:
    >>> import torch
    >>> from pbnn.kernels import sgmcmc
    >>> grad_fn = lambda z: z.clone()                        # N(0, I / N) per datum, N = 1
    >>> gen = torch.Generator().manual_seed(0)
    >>> rule, schedule = sgmcmc.sgld(num_data=1), sgmcmc.constant_schedule(0.1, thinning=5)
    >>> state = sgmcmc.init(rule, torch.ones(3))
    >>> state, info = sgmcmc.transition(state, grad_fn, rule, schedule, gen)
    >>> state.step, info["step_size"]
    (5, tensor([0.1000]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch


# ---------------------------------------------------------------------------- update rules
def sgld_step(
    position: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SGLD step: ``theta - lr * grad + sqrt(2 * lr * T / N) * noise``.

    ``grad`` is the gradient of the per-datum loss ``-log p~(theta | D) / N``; ``noise`` a
    standard normal draw shaped like ``position``, or None for a plain gradient step (the
    exploration stage of cyclical SGLD).

    Example:
        >>> import torch
        >>> sgld_step(torch.tensor([1.0]), torch.tensor([2.0]), lr=0.5, num_data=4, noise=torch.tensor([1.0]))
        tensor([0.5000])
    """
    new = position - lr * grad
    if noise is not None:
        new = new + math.sqrt(2.0 * lr * temperature / num_data) * noise
    return new


def sghmc_step(
    position: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    friction: float = 0.1,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGHMC step (Chen et al. 2014, in cSGHMC's form); returns ``(position, momentum)``.

    ``momentum <- (1 - a) momentum - lr * grad + sqrt(2 * lr * a * T / N) * noise`` and
    ``position <- position + momentum``, with friction ``a`` (``a = 1`` is SGLD).

    Example:
        >>> import torch
        >>> sghmc_step(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]), lr=0.1, num_data=1, friction=0.5)
        (tensor([0.3000]), tensor([0.3000]))
    """
    momentum = (1.0 - friction) * momentum - lr * grad
    if noise is not None:
        momentum = momentum + math.sqrt(2.0 * lr * friction * temperature / num_data) * noise
    return position + momentum, momentum


def psgld_step(
    position: torch.Tensor,
    square_avg: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
    alpha: float = 0.99,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pSGLD step (Li et al. 2016): RMSprop-preconditioned SGLD; returns ``(position, square_avg)``.

    ``V <- alpha V + (1 - alpha) grad^2``, ``G = 1 / (eps + sqrt(V))``, then
    ``theta - lr * G * grad + sqrt(2 * lr * T * G / N) * noise``. The Gamma correction term
    is dropped, as in the paper's experiments.

    Example:
        >>> import torch
        >>> pos, v = psgld_step(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]), lr=0.1, num_data=1)
        >>> round(float(v), 4), round(float(pos), 3)
        (0.04, -1.0)
    """
    square_avg = alpha * square_avg + (1.0 - alpha) * grad * grad
    precond = 1.0 / (eps + square_avg.sqrt())
    new = position - lr * precond * grad
    if noise is not None:
        new = new + (2.0 * lr * temperature / num_data * precond).sqrt() * noise
    return new, square_avg


# ---------------------------------------------------------------------------- schedules
def constant(step: int, step_size: float) -> float:
    """Constant schedule.

    Example:
        >>> constant(10, 0.1)
        0.1
    """
    return step_size


def polynomial_decay(step: int, a: float, b: float, gamma: float) -> float:
    """Welling & Teh's ``a * (b + t)^-gamma``; ``gamma`` in (0.5, 1] makes the sum of step
    sizes diverge and the sum of their squares converge.

    Example:
        >>> polynomial_decay(0, 1.0, 1.0, 0.55), polynomial_decay(3, 1.0, 1.0, 0.5)
        (1.0, 0.5)
    """
    return a * (b + step) ** -gamma


def cyclical_cosine(step: int, step_size: float, num_steps: int, num_cycles: int) -> float:
    """Cyclical cosine step size (Zhang et al. 2020) at iteration ``k = step`` (1-based) of ``K``:
    ``alpha_0 / 2 * (cos(pi * mod(k - 1, ceil(K / M)) / ceil(K / M)) + 1)``.

    Example:
        >>> [round(cyclical_cosine(k, 1.0, 8, 2), 3) for k in range(1, 6)]
        [1.0, 0.854, 0.5, 0.146, 1.0]
    """
    length = math.ceil(num_steps / num_cycles)
    return step_size / 2 * (math.cos(math.pi * ((step - 1) % length) / length) + 1)


def is_exploration(step: int, num_steps: int, num_cycles: int, exploration: float) -> bool:
    """Whether iteration ``k = step`` (1-based) lies in the first fraction ``beta = exploration``
    of its cycle: ``mod(k - 1, ceil(K / M)) / ceil(K / M) < beta``.

    Example:
        >>> [is_exploration(k, 8, 2, 0.5) for k in range(1, 6)]
        [True, True, False, False, True]
    """
    length = math.ceil(num_steps / num_cycles)
    return ((step - 1) % length) / length < exploration


def cycle_index(step: int, num_steps: int, num_cycles: int) -> int:
    """0-based cycle of iteration ``k = step`` (1-based).

    Example:
        >>> [cycle_index(k, 8, 2) for k in (1, 4, 5, 8)]
        [0, 0, 1, 1]
    """
    return (step - 1) // math.ceil(num_steps / num_cycles)


# ---------------------------------------------------------------------------- rules with state
class Rule(NamedTuple):
    """An update rule: ``init(z) -> aux`` and ``update(z, aux, grad, lr, noise) -> (z, aux)``."""

    init: Callable[[torch.Tensor], torch.Tensor | None]
    update: Callable


def sgld(num_data: int, temperature: float = 1.0) -> Rule:
    """SGLD (Welling & Teh 2011)."""
    return Rule(lambda z: None, lambda z, aux, g, lr, noise: (sgld_step(z, g, lr, num_data, temperature, noise), aux))


def sghmc(num_data: int, friction: float = 0.1, temperature: float = 1.0) -> Rule:
    """SGHMC (Chen, Fox & Guestrin 2014) with friction ``a``; the momentum starts at zero."""
    return Rule(
        torch.zeros_like, lambda z, m, g, lr, noise: sghmc_step(z, m, g, lr, num_data, friction, temperature, noise)
    )


def psgld(num_data: int, temperature: float = 1.0, alpha: float = 0.99, eps: float = 1e-5) -> Rule:
    """pSGLD (Li et al. 2016); the squared-gradient average starts at zero."""
    return Rule(
        torch.zeros_like, lambda z, v, g, lr, noise: psgld_step(z, v, g, lr, num_data, temperature, noise, alpha, eps)
    )


# ---------------------------------------------------------------------------- schedules of a sampler
class Schedule(NamedTuple):
    """Functions of the 1-based gradient step: its learning rate, whether it explores
    (no noise, no draw), whether a draw is collected after it, and its cycle (or None)."""

    lr: Callable[[int], float]
    exploring: Callable[[int], bool]
    collect: Callable[[int], bool]
    cycle: Callable[[int], int] | None = None


def constant_schedule(lr: float, thinning: int = 1) -> Schedule:
    return Schedule(lambda k: constant(k, lr), lambda k: False, lambda k: k % thinning == 0)


def polynomial_schedule(lr: float, b: float, gamma: float, thinning: int = 1) -> Schedule:
    """``lr (1 + t / b)^-gamma`` at 0-based step ``t``: Welling & Teh's decay, starting at ``lr``."""
    a = lr * b**gamma
    return Schedule(lambda k: polynomial_decay(k - 1, a, b, gamma), lambda k: False, lambda k: k % thinning == 0)


def cyclical_schedule(lr: float, cycle_length: int, num_cycles: int, exploration: float, thinning: int = 1) -> Schedule:
    """Zhang et al. (2020): the cyclical cosine from ``lr = alpha_0`` over ``cycle_length`` steps
    per cycle (``K = cycle_length * num_cycles``); the first fraction ``exploration`` of each
    cycle explores; in the sampling stage every ``thinning``-th step, counted back from the
    cycle's last step, is a draw."""
    K = cycle_length * num_cycles  # ceil(K / M) == cycle_length
    return Schedule(
        lambda k: cyclical_cosine(k, lr, K, num_cycles),
        lambda k: is_exploration(k, K, num_cycles, exploration),
        lambda k: (cycle_length - 1 - (k - 1) % cycle_length) % thinning == 0,
        lambda k: cycle_index(k, K, num_cycles),
    )


# ---------------------------------------------------------------------------- transition
class SGState(NamedTuple):
    """Position ``z``, the rule's auxiliary state, gradient steps taken and the last learning rate."""

    z: torch.Tensor
    aux: torch.Tensor | None
    step: int
    lr: float


def init(rule: Rule, z: torch.Tensor, lr: float = math.nan) -> SGState:
    return SGState(z, rule.init(z), 0, lr)


def transition(
    state: SGState,
    grad_fn: Callable[[torch.Tensor], torch.Tensor],
    rule: Rule,
    schedule: Schedule,
    gen: torch.Generator,
    name: str = "SG-MCMC",
) -> tuple[SGState, dict[str, torch.Tensor]]:
    """Gradient steps up to the next collection point. ``grad_fn(z)`` is the gradient of the
    per-datum minibatch loss (it draws its minibatch first); the noise is drawn from ``gen``
    after it. Raises a ValueError naming the step when the parameters become NaN/inf.

    Returns the state and ``{"step_size": [1]}`` (the learning rate of the last step; also
    ``"cycle"`` for a cyclical schedule)."""
    z, aux, k, lr = state
    while True:
        k += 1
        lr = schedule.lr(k)
        noisy = not schedule.exploring(k)
        grad = grad_fn(z)
        noise = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device) if noisy else None
        with torch.no_grad():
            z, aux = rule.update(z, aux, grad, lr, noise)
        if not torch.isfinite(z).all():
            raise ValueError(
                f"{name}: the parameters became NaN/inf at gradient step {k} (step size {lr:.3g}); lower lr "
                f"(e.g. to {lr / 10:.3g}), standardise x and y, or use pSGLD"
            )
        if noisy and schedule.collect(k):
            break
    info = {"step_size": torch.tensor([lr], dtype=z.dtype)}
    if schedule.cycle is not None:
        info["cycle"] = torch.tensor([schedule.cycle(k)])
    return SGState(z, aux, k, lr), info
