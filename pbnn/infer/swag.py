"""SWA, SWAG and MultiSWAG (Maddox et al. 2019; Wilson and Izmailov 2020): Gaussians fitted to
the iterates of SGD with momentum at a constant learning rate, after ``map_steps`` of MAP
pre-training (:func:`pbnn.engine.optim.fit_points`, each run clipped on its own). The update
rules, the draws and the BatchNorm refresh are in ``docs/imitation.md``; everything lives in the
flat unconstrained ``z``, so a learned noise scale is part of every draw.

SWA's mean is SWAG's running mean (``SwagMoments``), not ``torch.optim.swa_utils.AveragedModel``:
the moments are collected anyway, and SWA must equal SWAG's mean for the same seed.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="swag", map_steps=100, num_steps=200, num_samples=10,
    ...                 progress=False, seed=0)
    >>> post.samples["0.weight"].shape, post.info["num_collected"]
    (torch.Size([1, 10, 8, 1]), 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pbnn.core.options import nonneg_int, option, optional, positive, positive_int
from pbnn.core.potential import Potential
from pbnn.engine import distributed
from pbnn.engine.optim import check_momentum, decay, fit_points, initial_points
from pbnn.engine.optim import sgd_batch_size as swag_batch_size
from pbnn.infer.base import Backend, OptimOptions, RunOptions, register
from pbnn.posterior.approx import FlatApproximation, LazyDraws, SwagMoments, SWAGNormal
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import has_batchnorm, predict_bn_refresh, predict_params

__all__ = ["SWA", "SWAG", "MultiSWAG", "SwagMoments", "SWAGNormal", "swag_batch_size"]


@register("swag")
@dataclass(frozen=True, kw_only=True)
class SWAG(Backend, RunOptions, OptimOptions):
    """SWA-Gaussian: mean, diagonal and low-rank covariance of constant-learning-rate SGD iterates.

    Args:
        rank: ``K``, the number of deviation columns (20 in the paper; 0 gives SWAG-diagonal).
        scale: covariance scale of the draws (0.5 in the paper; 1.0 for SWAG-diagonal).
        map_steps: MAP pre-training steps (Adam with ``lr`` decaying 10x on the per-datum
            loss) before collection starts (formerly ``start``).
        num_steps: total steps, pre-training included; ``num_steps - map_steps`` SGD steps.
        collect_every: SGD steps between collected iterates (default: one epoch).
        lr: MAP pre-training (Adam) learning rate.
        swag_lr: constant SGD learning rate of the collection phase (on the negative log
            joint per data point).
        momentum: SGD momentum (0.9 as in the paper).
        batch_size: minibatch size; default: full batch for pre-training up to 2048 points,
            and ten minibatches per epoch (at most 256 points) for the SGD phase, whose
            gradient noise is what SWAG measures.
        num_samples: draws stored in the Posterior (30 in the paper).
        others: as in ``OptimOptions`` and ``RunOptions``; checkpoints cover the MAP pre-training.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SWAG(rank=10).scale
        0.5
    """

    renamed = {"start": "map_steps"}
    _mean_only = False
    rank: int = option(20, nonneg_int)
    scale: float = option(0.5, positive)
    map_steps: int = option(3000, nonneg_int)
    num_steps: int = option(4000, positive_int)
    collect_every: int | None = option(None, optional(positive_int))
    swag_lr: float = option(0.003, positive)
    momentum: float = option(0.9, check_momentum)
    num_samples: int = option(30, positive_int)

    def validate(self) -> None:
        super().validate()
        if self.num_steps <= self.map_steps:
            raise ValueError(
                f"num_steps ({self.num_steps}) must exceed map_steps ({self.map_steps}): the SGD phase runs "
                "num_steps - map_steps steps"
            )

    # ------------------------------------------------------------------ the shared run
    def _collect(self, potential: Potential, num_runs: int, desc: str):
        """Pre-train and collect ``num_runs`` independent SWAG runs; returns (moments, fixed, info)."""
        n = len(potential)
        sgd_batch = swag_batch_size(self.batch_size, n)
        potential.require(self.name, minibatch=sgd_batch is not None or self.resolved_batch_size(n) is not None)
        every = self.collect_every or (1 if sgd_batch is None else math.ceil(n / sgd_batch))
        sgd_steps = self.num_steps - self.map_steps
        if sgd_steps < every:
            raise ValueError(
                f"the SGD phase ({sgd_steps} steps) is shorter than collect_every ({every}); "
                "raise num_steps or lower collect_every"
            )
        # Independent starting points for MultiSWAG; SWAG keeps the network's own init.
        seeds = [None] if num_runs == 1 else [int(torch.randint(0, 2**31 - 1, ()).item()) + m for m in range(num_runs)]
        z, fixed = initial_points(potential, seeds)
        if num_runs > 1:  # distributed MultiSWAG: every rank draws all starts and runs its block of members
            mine = distributed.chain_slice(num_runs, every_rank=True)
            z, fixed = z[mine], {k: v[mine] for k, v in fixed.items()}
        losses: list[float] = []
        if self.map_steps > 0:
            z, fixed, losses = self._pretrain(potential, z, fixed, desc)
        moments = SwagMoments(potential.dim, self.rank, len(z))

        def collect(t, zt):
            if (t + 1) % every == 0:
                moments.update(zt.clone())

        _, _, sgd_losses = fit_points(
            potential,
            z,
            fixed,
            num_steps=sgd_steps,
            lr=self.swag_lr,
            optimizer="sgd",
            momentum=self.momentum,
            batch_size=sgd_batch,
            accumulate=self.accumulate,
            train_fixed=False,  # deterministic parameters stay at their pre-trained values
            on_step=collect,
            desc=f"{desc} SGD",
            progress=self.progress,
        )
        if num_runs > 1:  # gather the members' moments in member order (a no-op in one process)
            losses = distributed.mean_over_chains(losses + sgd_losses, len(z))
            moments.mean, moments.sq_mean, devs, fixed = distributed.gather_chains(
                (moments.mean, moments.sq_mean, tuple(moments._devs), fixed)
            )
            moments._devs, sgd_losses = list(devs), []
        info = {"losses": losses + sgd_losses, "num_collected": moments.n, "collect_every": every}
        return moments, fixed, info

    def _pretrain(self, potential: Potential, z, fixed, desc: str):
        """The MAP pre-training of every run at once (:func:`pbnn.engine.optim.fit_points`: the
        per-datum loss of the SGD phase, each run's gradient clipped on its own, as in Maddox et
        al.'s code). Rank-local: under ``torch.distributed`` ranks train different members."""
        with distributed.rank_local():
            return fit_points(
                potential,
                z,
                fixed,
                num_steps=self.map_steps,
                lr=decay(self.lr, self.map_steps),
                desc=f"{desc} MAP",
                **self.optim_args(len(potential)),
            )

    def _posterior(self, potential: Potential, moments, fixed, info) -> Posterior:
        q = moments.distribution(self.scale)
        runs = moments.mean.shape[0]
        det = {k: v[0] for k, v in fixed.items()}
        predictor, approx = None, None
        if not self._mean_only and not (fixed and runs > 1):  # one chain per run, drawn on demand
            approx = FlatApproximation(q, potential.layout.sites)
            samples = LazyDraws.from_rng(approx, self.num_samples, num_chains=runs)
        else:
            z = moments.mean[:, None] if self._mean_only else q.sample_runs(self.num_samples)  # [runs, draws, D]
            samples = dict(potential.layout.constrain(z))
        if fixed and runs > 1:  # deterministic parameters differ per run
            samples.update({k: v[:, None].expand((-1, z.shape[1]) + v.shape[1:]) for k, v in fixed.items()})
            det, predictor = {}, predict_params
        if potential.kind == "bnn" and has_batchnorm(potential.model.net):
            predictor = predict_bn_refresh
        info = {**info, "rank": self.rank, "scale": self.scale}
        return self.posterior(potential, samples, fixed=det, approximation=approx, predictor=predictor, info=info)

    def run(self, potential: Potential) -> Posterior:
        moments, fixed, info = self._collect(potential, 1, self.name.upper())
        return self._posterior(potential, moments, fixed, info)


@register("swa")
@dataclass(frozen=True, kw_only=True)
class SWA(SWAG):
    """Stochastic weight averaging (Izmailov et al. 2018): the mean of the SGD iterates, one draw.

    Same options as :class:`SWAG` (``rank``, ``scale`` and ``num_samples`` are unused).

    Example:
        >>> import pbnn
        >>> pbnn.infer.SWA(map_steps=1000, num_steps=1500).map_steps
        1000
    """

    _mean_only = True


@register("multiswag")
@dataclass(frozen=True, kw_only=True)
class MultiSWAG(SWAG):
    """An ensemble of ``num_members`` independent SWAG runs (Wilson and Izmailov 2020).

    Each member starts from its own random initialisation; ``num_samples`` draws are taken
    from each member, stored as one chain per member (``[member, draw, *shape]``).
    Other options as :class:`SWAG`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.MultiSWAG(num_members=3).num_members
        3
    """

    num_members: int = option(3, positive_int)
    num_samples: int = option(20, positive_int)

    def run(self, potential: Potential) -> Posterior:
        moments, fixed, info = self._collect(potential, self.num_members, "MultiSWAG")
        post = self._posterior(potential, moments, fixed, info)
        post.info["num_members"] = self.num_members
        return post
