"""Fast geometric ensembling (Garipov, Izmailov, Podoprikhin, Vetrov and Wilson, NeurIPS 2018).

From a pretrained MAP (Adam, as :class:`pbnn.infer.MAP`), SGD with momentum runs with a
triangular cyclical learning rate; at the middle of each cycle, where the learning rate
is lowest, the weights are saved. The snapshots are the posterior draws (one chain).

Schedule (the paper's code, with the cycle measured in steps): at step ``k`` (0-based) let
``t = (k mod c) / c``; ``lr = (1 - 2t) lr_max + 2t lr_min`` for ``t < 1/2`` and
``lr = (2t - 1) lr_max + (2 - 2t) lr_min`` after. A snapshot is taken after the step that
completes the first half of the cycle (``(k + 1) mod c == c / 2``), i.e. at ``t = 1/2``
where ``lr = lr_min``.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="fge", pretrain_steps=100, num_cycles=4,
    ...                 cycle_length=10, progress=False, seed=0)
    >>> post.samples["0.weight"].shape            # [1, snapshot, *shape]
    torch.Size([1, 4, 8, 1])
"""

from __future__ import annotations

import math

import torch

from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_positive, check_positive_int, register
from pbnn.engine.pointfit import decaying_lr, has_batchnorm, initial_points, predict_bn_refresh, require_bnn, train_points
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import resolve_batch_size, seeded

__all__ = ["FGE", "fge_lr"]


def fge_lr(step: int, cycle_length: int, lr_max: float, lr_min: float) -> float:
    """The triangular cyclical learning rate of FGE at 0-based ``step``.

    Example:
        >>> [round(fge_lr(k, 4, 0.05, 1e-4), 5) for k in range(5)]
        [0.05, 0.02505, 0.0001, 0.02505, 0.05]
    """
    t = (step % cycle_length) / cycle_length
    if t < 0.5:
        return (1.0 - 2.0 * t) * lr_max + 2.0 * t * lr_min
    return (2.0 * t - 1.0) * lr_max + (2.0 - 2.0 * t) * lr_min


@register("fge")
class FGE(Backend):
    """Snapshots of SGD with a triangular cyclical learning rate around a pretrained MAP.

    Args:
        cycle_length: steps per cycle, even (default: 4 epochs, the paper's choice).
        lr_max, lr_min: the schedule's ``lr1`` and ``lr2``, for SGD on the negative log
            joint per data point. The paper's 0.05 and 1e-4 are for CIFAR ResNets; on
            standardised regression data ``lr_max = 0.05`` makes SGD wander far from the
            mode (the learned noise scale inflates ~10x on the demo), so pbnn uses 0.01.
        num_cycles: number of cycles = number of snapshots (draws).
        pretrain_steps: Adam steps towards the MAP first (``lr`` decaying 10x).
        lr: pretraining learning rate.
        momentum: SGD momentum.
        batch_size: minibatch size; default: full batch for pretraining up to 2048 points,
            ten minibatches per epoch (at most 256 points) for the cyclical phase.
        accumulate: average gradients over this many minibatches per step.
        seed: seed for minibatches.
        progress: show tqdm bars.

    Example:
        >>> import pbnn
        >>> pbnn.infer.FGE(cycle_length=40).lr_max
        0.01
    """

    name = "fge"

    def __init__(
        self,
        cycle_length: int | None = None,
        lr_max: float = 0.01,
        lr_min: float = 1e-4,
        num_cycles: int = 20,
        pretrain_steps: int = 3000,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int | None = None,
        accumulate: int = 1,
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        if cycle_length is not None:
            check_positive_int("cycle_length", cycle_length)
            if cycle_length % 2:
                raise ValueError(f"cycle_length must be even (snapshots are taken at its midpoint), got {cycle_length}")
        self.cycle_length = cycle_length
        self.lr_max = check_positive("lr_max", lr_max)
        self.lr_min = check_positive("lr_min", lr_min)
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min ({lr_min}) must not exceed lr_max ({lr_max})")
        self.num_cycles = check_positive_int("num_cycles", num_cycles)
        if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be a non-negative integer, got {pretrain_steps!r}")
        self.pretrain_steps = pretrain_steps
        self.lr = check_positive("lr", lr)
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.accumulate = check_positive_int("accumulate", accumulate)
        self.seed = seed
        self.progress = progress

    def fit(self, model, data: Data) -> Posterior:
        model = require_bnn(model, self.name)
        n = len(data)
        potential = Potential(model, data)
        if self.batch_size is None:
            sgd_batch = None if n < 10 else min(256, math.ceil(n / 10))
        else:
            sgd_batch = resolve_batch_size(self.batch_size, n)
        per_epoch = 1 if sgd_batch is None else math.ceil(n / sgd_batch)
        cycle = self.cycle_length or 2 * max(1, (4 * per_epoch) // 2)
        with seeded(self.seed):
            z, fixed = initial_points(model, potential, [None])
            losses: list[float] = []
            if self.pretrain_steps > 0:
                z, fixed, losses = train_points(
                    potential,
                    z,
                    fixed,
                    num_steps=self.pretrain_steps,
                    lr=decaying_lr(self.lr, self.pretrain_steps),
                    batch_size=resolve_batch_size(self.batch_size, n),
                    accumulate=self.accumulate,
                    desc="FGE pretraining",
                    progress=self.progress,
                )
            snapshots: list[torch.Tensor] = []

            def snapshot(k, zk):
                if (k + 1) % cycle == cycle // 2:
                    snapshots.append(zk[0].clone())

            _, _, cyc_losses = train_points(
                potential,
                z,
                fixed,
                num_steps=self.num_cycles * cycle,
                lr=lambda k: fge_lr(k, cycle, self.lr_max, self.lr_min),
                optimizer="sgd",
                momentum=self.momentum,
                batch_size=sgd_batch,
                accumulate=self.accumulate,
                train_fixed=False,
                on_step=snapshot,
                desc="FGE cycles",
                progress=self.progress,
            )
        values, _ = potential.unpack(torch.stack(snapshots))
        samples = {k: v[None] for k, v in values.items()}
        return Posterior(
            model,
            samples,
            data=data,
            method=self.name,
            fixed={k: v[0] for k, v in fixed.items()},
            predictor=predict_bn_refresh if has_batchnorm(model.net) else None,
            info={"losses": losses + cyc_losses, "cycle_length": cycle},
        )
