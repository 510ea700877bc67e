"""Fast geometric ensembling (Garipov, Izmailov, Podoprikhin, Vetrov and Wilson, NeurIPS 2018).

From a pre-trained MAP (``map_steps``, :func:`pbnn.engine.optim.fit_points`), SGD with momentum
runs with a triangular cyclical learning rate (:func:`fge_lr`); the weights at the middle of each
cycle, where the learning rate is lowest, are the posterior draws (one chain). Schedule and
snapshot rule: ``docs/imitation.md``.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="fge", map_steps=100, num_cycles=4,
    ...                 cycle_length=10, progress=False, seed=0)
    >>> post.samples["0.weight"].shape            # [1, snapshot, *shape]
    torch.Size([1, 4, 8, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pbnn.core.options import nonneg_int, option, optional, positive, positive_int
from pbnn.core.potential import Potential
from pbnn.engine import distributed
from pbnn.engine.optim import check_momentum, decay, fit_points, resolve_batch_size, sgd_batch_size
from pbnn.infer.base import Backend, RunOptions, register
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import has_batchnorm, predict_bn_refresh

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
@dataclass(frozen=True, kw_only=True)
class FGE(Backend, RunOptions):
    """Snapshots of SGD with a triangular cyclical learning rate around a pre-trained MAP.

    Args:
        cycle_length: steps per cycle, even (default: 4 epochs, the paper's choice).
        lr_max, lr_min: the schedule's ``lr1`` and ``lr2``, for SGD on the negative log
            joint per data point. The paper's 0.05 and 1e-4 are for CIFAR ResNets; on
            standardised regression data ``lr_max = 0.05`` makes SGD wander far from the
            mode (the learned noise scale inflates ~10x on the demo), so pbnn uses 0.01.
        num_cycles: number of cycles = number of snapshots (draws).
        map_steps: MAP pre-training steps (Adam, ``lr`` decaying 10x; formerly ``pretrain_steps``).
        lr: MAP pre-training learning rate.
        momentum: SGD momentum.
        batch_size: minibatch size; default: full batch for pre-training up to 2048 points,
            ten minibatches per epoch (at most 256 points) for the cyclical phase.
        accumulate, seed, progress: as in ``OptimOptions`` and ``RunOptions``.

    Example:
        >>> import pbnn
        >>> pbnn.infer.FGE(cycle_length=40).lr_max
        0.01
    """

    renamed = {"pretrain_steps": "map_steps"}
    cycle_length: int | None = option(None, optional(positive_int))
    lr_max: float = option(0.01, positive)
    lr_min: float = option(1e-4, positive)
    num_cycles: int = option(20, positive_int)
    map_steps: int = option(3000, nonneg_int)
    lr: float = option(0.01, positive)
    momentum: float = option(0.9, check_momentum)
    batch_size: int | None = option(None, optional(positive_int))
    accumulate: int = option(1, positive_int)

    def validate(self) -> None:
        super().validate()
        if self.cycle_length is not None and self.cycle_length % 2:
            raise ValueError(
                f"cycle_length must be even (snapshots are taken at its midpoint), got {self.cycle_length}"
            )
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr_max ({self.lr_max})")

    def run(self, potential: Potential) -> Posterior:
        n = len(potential)
        sgd_batch = sgd_batch_size(self.batch_size, n)
        potential.require(
            self.name, minibatch=sgd_batch is not None or resolve_batch_size(self.batch_size, n) is not None
        )
        per_epoch = 1 if sgd_batch is None else math.ceil(n / sgd_batch)
        cycle = self.cycle_length or 2 * max(1, (4 * per_epoch) // 2)
        z, fixed, losses = potential.initial_z()[None], {k: v[None] for k, v in potential.fixed.items()}, []
        if self.map_steps > 0:  # the per-datum loss of the cycles, as in Garipov et al.'s code
            with distributed.rank_local():  # FGE is not distributed: every rank runs the whole fit
                z, fixed, losses = fit_points(
                    potential,
                    z,
                    fixed,
                    num_steps=self.map_steps,
                    lr=decay(self.lr, self.map_steps),
                    batch_size=resolve_batch_size(self.batch_size, n),
                    accumulate=self.accumulate,
                    desc="FGE MAP",
                    progress=self.progress,
                )
        snapshots: list[torch.Tensor] = []

        def snapshot(k, zk):
            if (k + 1) % cycle == cycle // 2:
                snapshots.append(zk[0].clone())

        _, _, cyc_losses = fit_points(
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
        samples = {k: v[None] for k, v in potential.layout.constrain(torch.stack(snapshots)).items()}
        return self.posterior(
            potential,
            samples,
            fixed={k: v[0] for k, v in fixed.items()},
            predictor=predict_bn_refresh if potential.kind == "bnn" and has_batchnorm(potential.model.net) else None,
            info={"losses": losses + cyc_losses, "cycle_length": cycle},
        )
