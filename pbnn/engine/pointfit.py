"""Point-estimate training shared by the "imitation" backends (ensembles, SWA/SWAG, FGE, MC dropout).

These methods start from MAP-style training of the network and imitate a posterior with
what the optimiser visits. This module is the one small trainer they share:

* :func:`map_log_joint` - the log joint of one flat unconstrained vector ``z`` (the
  :class:`pbnn.potential.Potential` packing, noise sites such as ``"sigma"`` included) at
  the constrained values (no Jacobian, as MAP), with optional per-datum weights
  (bootstrap), per-tensor prior weights (MC dropout's ``p_keep`` factor) and a weight
  transform (DropConnect masks);
* :func:`train_points` - Adam or SGD (momentum) on ``M`` independent points at once
  (``z`` of shape ``[M, D]``; the optimisers act elementwise and the clipping is per
  point, so this equals ``M`` separate runs, one after the other), with a learning-rate schedule, a
  per-point gradient-norm clip, minibatches and gradient accumulation over ``accumulate``
  minibatches, a tqdm bar through :func:`pbnn.engine.training.optimise`, and a callback after
  each step (SWAG moments, FGE snapshots);
* :func:`initial_points` - ``M`` starting points from the modules' own
  ``reset_parameters`` under different seeds (independent initialisations);
* :func:`predict_params` - a Posterior ``predictor`` for draws that also carry
  deterministic parameters or BatchNorm statistics per draw.

Example:
    >>> import torch, pbnn
    >>> from pbnn.engine.pointfit import initial_points, train_points
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0]
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> pot = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
    >>> z0, fixed0 = initial_points(model, pot, seeds=[0, 1])
    >>> z, fixed, losses = train_points(pot, z0, fixed0, num_steps=300, lr=0.05, progress=False)
    >>> z.shape, [round(v, 1) for v in z[:, 0].tolist()]
    (torch.Size([2, 2]), [2.0, 2.0])
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from pbnn.core.model import BNN
from pbnn.core.potential import Potential
from pbnn.posterior.predictive import Prediction, chunked_vmap, default_chunk_size
from pbnn.engine.training import optimise, seeded

__all__ = [
    "map_log_joint",
    "initial_points",
    "train_points",
    "decaying_lr",
    "predict_params",
    "predict_bn_refresh",
    "require_bnn",
    "has_batchnorm",
]

OPTIMIZERS = ("adam", "sgd")


def require_bnn(model, method: str) -> BNN:
    if not isinstance(model, BNN):
        raise ValueError(
            f"method {method!r} trains network weights and needs a pbnn.BNN; for a hand-written Pyro "
            "model use method='svi' or 'map'"
        )
    return model


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def map_log_joint(
    potential: Potential,
    z: torch.Tensor,
    idx: torch.Tensor | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    *,
    weights: torch.Tensor | None = None,
    prior_weights: dict[str, float] | None = None,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``log p(theta(z)) + (N / B) sum_i w_i log p(y_i | x_i, theta(z))`` without the Jacobian.

    With no options this equals ``potential.log_joint(z, idx, fixed, jacobian=False)``.

    Args:
        weights: per-datum likelihood weights ``[N]`` (bootstrap counts), or None.
        prior_weights: factor on the log prior of single weight tensors (MC dropout's
            ``p_keep``: the KL of a dropout layer is ``p_keep`` times the L2 term).
        transform: maps the weight values before the likelihood (DropConnect masks).
    """
    model = potential.model
    sample, _ = potential.unpack(z)
    x, y, scale = potential.data.x, potential.data.y, 1.0
    if idx is not None:
        x, y, scale = x[idx], y[idx], len(potential.data) / idx.shape[0]
    lik_sample = transform(sample) if transform is not None else sample
    ll = model.log_likelihood(lik_sample, x, y, fixed)
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


def initial_points(
    model: BNN, potential: Potential, seeds: list[int | None]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One starting point per seed: ``z0`` ``[M, D]`` and deterministic parameters ``{name: [M, ...]}``.

    A seed of None keeps the network's own initialisation; otherwise every submodule with
    ``reset_parameters`` (Linear, Conv, BatchNorm, ...) is re-initialised under that seed,
    so members start independently. Noise sites start at their prior median.
    """
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


def decaying_lr(lr: float, num_steps: int) -> Callable[[int], float]:
    """The MAP backend's schedule: ``lr`` decaying exponentially by 10x over ``num_steps``."""
    return lambda t: lr * 0.1 ** (t / num_steps)


def train_points(
    potential: Potential,
    z0: torch.Tensor,
    fixed0: dict[str, torch.Tensor] | None = None,
    *,
    num_steps: int,
    lr: float | Callable[[int], float],
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    accumulate: int = 1,
    log_joint: Callable[..., torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    train_fixed: bool = True,
    clip_norm: float | None = 10.0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    desc: str = "point fit",
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    """Maximise the log joint of ``M`` independent points ``z0`` ``[M, D]`` with Adam or SGD.

    Args:
        potential: the model's :class:`pbnn.potential.Potential` (fixes the packing of ``z``).
        z0, fixed0: starting points and deterministic parameters (``{name: [M, ...]}``).
        num_steps: optimiser steps (each averages ``accumulate`` minibatch gradients).
        lr: a number, or a schedule ``step -> lr``.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        batch_size: minibatch size, None for full batch.
        log_joint: ``f(z, idx, fixed, weights) -> scalar`` for one point (default
            :func:`map_log_joint`); it may use torch's RNG (dropout).
        weights: per-point likelihood weights ``[M, N]`` passed to ``log_joint``.
        train_fixed: also optimise the deterministic parameters (else hold them).
        clip_norm: clip each point's gradient norm (the loss is per data point).
        on_step: ``on_step(step, z)`` after each step with the detached ``z`` ``[M, D]``.

    Returns:
        ``(z [M, D], fixed {name: [M, ...]}, losses)``, losses = mean over points of
        ``-log joint / N``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
    n = len(potential.data)
    num_points = z0.shape[0]
    z = z0.detach().clone().requires_grad_(True)
    fixed = {k: v.detach().clone().requires_grad_(train_fixed) for k, v in (fixed0 or {}).items()}
    params = [z, *fixed.values()] if train_fixed else [z]
    if log_joint is None:

        def log_joint(zz, idx, fx, w):
            return map_log_joint(potential, zz, idx, fx, weights=w)

    def per_point(idx):  # [M] log joints; points are independent, so one backward serves all
        return torch.stack(
            [
                log_joint(z[m], idx, {k: v[m] for k, v in fixed.items()}, None if weights is None else weights[m])
                for m in range(num_points)
            ]
        )

    opt = (
        torch.optim.Adam(params, lr=0.0) if optimizer == "adam" else torch.optim.SGD(params, lr=0.0, momentum=momentum)
    )
    schedule = lr if callable(lr) else (lambda t: lr)
    counter = {"t": 0}
    pending: list = []

    def step(idx):
        # Gradient accumulation: the first accumulate-1 calls only store their minibatch.
        pending.append(idx)
        if len(pending) < accumulate:
            return counter.get("last", 0.0)
        t = counter["t"]
        for group in opt.param_groups:
            group["lr"] = schedule(t)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in pending:
            loss = -per_point(b).sum() / (n * len(pending))
            loss.backward()
            total += float(loss.detach())
        pending.clear()
        if clip_norm is not None:
            _clip_per_point(params, num_points, clip_norm)
        opt.step()
        counter["t"] = t + 1
        counter["last"] = total / num_points
        if on_step is not None:
            on_step(t, z.detach())
        return counter["last"]

    losses = optimise(
        step, num_steps * accumulate, n, batch_size, desc=desc, progress=progress, loss_name="-log joint/N"
    )
    if accumulate > 1:
        losses = losses[accumulate - 1 :: accumulate]
    return z.detach(), {k: v.detach() for k, v in fixed.items()}, losses


def _clip_per_point(params: list[torch.Tensor], num_points: int, max_norm: float) -> None:
    """Clip each point's gradient (all its tensors together) to ``max_norm``, as
    ``clip_grad_norm_`` would in a separate run per point."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.reshape(num_points, -1).pow(2).sum(1) for g in grads)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.reshape((num_points,) + (1,) * (g.dim() - 1)))


def predict_params(post, draws: dict[str, torch.Tensor], x: torch.Tensor) -> Prediction:
    """Posterior ``predictor`` for draws that carry any network tensors per draw.

    Draws may hold, besides the Bayesian weights, deterministic parameters (one value per
    ensemble member) and BatchNorm buffers (statistics recomputed per draw); every draw
    entry whose name is a parameter or buffer of the net is passed to the network.
    The network runs in eval mode.
    """
    model = post.model
    tensors = {n for n, _ in model.net.named_parameters()} | {n for n, _ in model.net.named_buffers()}
    per_draw = {k: v for k, v in draws.items() if k in tensors}
    fixed = {k: v for k, v in post.fixed.items() if k not in per_draw}
    was_training = model.net.training
    model.net.eval()
    try:
        with torch.no_grad():
            f = chunked_vmap(lambda w: model.output({**fixed, **w}, x), per_draw, default_chunk_size(x.shape[0]))
    finally:
        model.net.train(was_training)
    noise = {n: draws[n] for n in model.noise_sites(f.shape[-1])}
    return Prediction(f, model.likelihood.conditional(f, noise))


def predict_bn_refresh(post, draws: dict[str, torch.Tensor], x: torch.Tensor) -> Prediction:
    """Posterior ``predictor`` for nets with BatchNorm: statistics recomputed for every draw.

    A weight draw that was never trained as such (a SWAG draw, an ensemble member) needs
    its own BatchNorm statistics (Maddox et al. 2019). For each draw this runs the training
    inputs through a private copy of the net with only the BatchNorm layers in train mode
    (cumulative averages, ``momentum=None``), then evaluates ``x`` in eval mode.
    """
    model = post.model
    net = copy.deepcopy(model.net)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    names = {n for n, _ in net.named_parameters()}
    num = next(iter(draws.values())).shape[0]
    outs = []
    with torch.no_grad():
        for s in range(num):
            params = {**post.fixed, **{k: v[s] for k, v in draws.items() if k in names}}
            net.eval()
            for m in bns:
                m.reset_running_stats()
                m.train()
            for chunk in post.data.x.split(1024):
                functional_call(net, params, (chunk,))
            net.eval()
            f = functional_call(net, params, (x,))
            outs.append(f.reshape(f.shape[0], -1))
    f = torch.stack(outs)
    noise = {n: draws[n] for n in model.noise_sites(f.shape[-1])}
    return Prediction(f, model.likelihood.conditional(f, noise))
