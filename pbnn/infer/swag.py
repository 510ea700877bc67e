"""SWA, SWAG and MultiSWAG: Gaussians fitted to the iterates of SGD at a constant learning rate.

After a pretraining phase (Adam towards the MAP, as :class:`pbnn.infer.MAP`), SGD with
momentum runs at a constant learning rate on minibatches, and every ``collect_every``
steps the current weights ``theta`` update (Maddox, Izmailov, Garipov, Vetrov and Wilson,
NeurIPS 2019):

* the running mean ``m`` and second moment ``s`` (``Sigma_diag = clamp(s - m^2, 1e-30)``),
* the last ``K = rank`` deviation columns ``D = [theta_i - m_i]`` (``m`` already updated).

A draw is ``theta = m + sqrt(scale) * (Sigma_diag^(1/2) z1 + D z2 / sqrt(K - 1))``, i.e. a
Gaussian with covariance ``scale * (Sigma_diag + D D^T / (K - 1))``. Everything lives in
the flat unconstrained space of :class:`pbnn.potential.Potential`, so a learned noise
scale ``sigma`` is part of the weights (as ``log sigma``) and of every draw.

* ``SWA`` ("swa"): the mean ``m`` only (one draw).
* ``SWAG`` ("swag"): ``num_samples`` draws; the posterior keeps the Gaussian, so
  ``predict(x, num_samples=...)`` can draw more.
* ``MultiSWAG`` ("multiswag"): ``num_members`` independent SWAG runs (Wilson and
  Izmailov 2020), one chain per member; with ``pbnn.fit(..., distributed=True)`` under
  ``torchrun`` the members are spread over the ranks and gathered (:mod:`pbnn.distributed`).

With BatchNorm in the net, each draw's BatchNorm statistics are recomputed on the
training inputs at prediction time (:func:`pbnn.engine.pointfit.predict_bn_refresh`).

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="swag", start=100, num_steps=200, num_samples=10,
    ...                 progress=False, seed=0)
    >>> post.samples["0.weight"].shape, post.info["num_collected"]
    (torch.Size([1, 10, 8, 1]), 10)
"""

from __future__ import annotations

import math

import torch

from pbnn.engine import distributed
from pbnn.posterior.approx import FlatApproximation, SwagMoments, SWAGNormal
from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_positive, check_positive_int, register
from pbnn.engine.pointfit import (
    decaying_lr,
    has_batchnorm,
    initial_points,
    predict_bn_refresh,
    predict_params,
    require_bnn,
    train_points,
)
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import resolve_batch_size, seeded

__all__ = ["SWA", "SWAG", "MultiSWAG", "SwagMoments", "SWAGNormal", "swag_batch_size"]


def swag_batch_size(batch_size: int | None, n: int) -> int | None:
    """SGD needs gradient noise to explore: by default ten minibatches per epoch (at most 256 points)."""
    if batch_size is None:
        return None if n < 10 else min(256, math.ceil(n / 10))
    return resolve_batch_size(batch_size, n)


@register("swag")
class SWAG(Backend):
    """SWA-Gaussian: mean, diagonal and low-rank covariance of constant-learning-rate SGD iterates.

    Args:
        rank: ``K``, the number of deviation columns (20 in the paper; 0 gives SWAG-diagonal).
        scale: covariance scale of the draws (0.5 in the paper; 1.0 for SWAG-diagonal).
        start: pretraining steps (Adam with ``lr`` decaying 10x, as :class:`pbnn.infer.MAP`)
            before collection starts.
        num_steps: total steps, pretraining included; ``num_steps - start`` SGD steps.
        collect_every: SGD steps between collected iterates (default: one epoch).
        lr: pretraining (Adam) learning rate.
        swag_lr: constant SGD learning rate of the collection phase (on the negative log
            joint per data point).
        momentum: SGD momentum (0.9 as in the paper).
        batch_size: minibatch size; default: full batch for pretraining up to 2048 points,
            and ten minibatches per epoch (at most 256 points) for the SGD phase, whose
            gradient noise is what SWAG measures.
        num_samples: draws stored in the Posterior (30 in the paper).
        accumulate: average gradients over this many minibatches per step.
        seed: seed for initialisation, minibatches and draws.
        progress: show tqdm bars.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SWAG(rank=10).scale
        0.5
    """

    name = "swag"
    _mean_only = False

    def __init__(
        self,
        rank: int = 20,
        scale: float = 0.5,
        start: int = 3000,
        num_steps: int = 4000,
        collect_every: int | None = None,
        lr: float = 0.01,
        swag_lr: float = 0.003,
        momentum: float = 0.9,
        batch_size: int | None = None,
        num_samples: int = 30,
        accumulate: int = 1,
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative integer (0: SWAG-diagonal), got {rank!r}")
        self.rank = rank
        self.scale = check_positive("scale", scale)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer number of pretraining steps, got {start!r}")
        self.start = start
        self.num_steps = check_positive_int("num_steps", num_steps)
        if num_steps <= start:
            raise ValueError(
                f"num_steps ({num_steps}) must exceed start ({start}): the SGD phase runs num_steps - start steps"
            )
        self.collect_every = None if collect_every is None else check_positive_int("collect_every", collect_every)
        self.lr = check_positive("lr", lr)
        self.swag_lr = check_positive("swag_lr", swag_lr)
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.accumulate = check_positive_int("accumulate", accumulate)
        self.seed = seed
        self.progress = progress

    # ------------------------------------------------------------------ the shared run
    def _run(self, model, data: Data, num_runs: int, desc: str):
        """Pretrain and collect ``num_runs`` independent SWAG runs; returns (moments, fixed, info)."""
        potential = Potential(model, data)
        n = len(data)
        sgd_batch = swag_batch_size(self.batch_size, n)
        every = self.collect_every or (1 if sgd_batch is None else math.ceil(n / sgd_batch))
        sgd_steps = self.num_steps - self.start
        if sgd_steps < every:
            raise ValueError(
                f"the SGD phase ({sgd_steps} steps) is shorter than collect_every ({every}); "
                "raise num_steps or lower collect_every"
            )
        # Independent starting points for MultiSWAG; SWAG keeps the network's own init.
        seeds = [None] if num_runs == 1 else [int(torch.randint(0, 2**31 - 1, ()).item()) + m for m in range(num_runs)]
        z, fixed = initial_points(model, potential, seeds)
        if num_runs > 1:  # distributed MultiSWAG: every rank draws all starts and runs its block of members
            mine = distributed.chain_slice(num_runs, every_rank=True)
            z, fixed = z[mine], {k: v[mine] for k, v in fixed.items()}
        losses: list[float] = []
        if self.start > 0:
            z, fixed, losses = train_points(
                potential,
                z,
                fixed,
                num_steps=self.start,
                lr=decaying_lr(self.lr, self.start),
                batch_size=resolve_batch_size(self.batch_size, n),
                accumulate=self.accumulate,
                desc=f"{desc} pretraining",
                progress=self.progress,
            )
        moments = SwagMoments(potential.dim, self.rank, len(z))

        def collect(t, zt):
            if (t + 1) % every == 0:
                moments.update(zt.clone())

        _, _, sgd_losses = train_points(
            potential,
            z,
            fixed,
            num_steps=sgd_steps,
            lr=self.swag_lr,
            optimizer="sgd",
            momentum=self.momentum,
            batch_size=sgd_batch,
            accumulate=self.accumulate,
            train_fixed=False,  # deterministic parameters stay at their pretrained values
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
        return potential, moments, fixed, info

    def _posterior(self, model, data, potential, moments, fixed, info, num_per_run: int) -> Posterior:
        q = moments.distribution(self.scale)
        if self._mean_only:
            z = moments.mean[:, None]  # [runs, 1, D]
        else:
            z = q.sample_runs(num_per_run)
        values, _ = potential.unpack(z)
        samples = dict(values)
        det = {k: v[0] for k, v in fixed.items()}
        predictor, approx = None, None
        if fixed and moments.mean.shape[0] > 1:  # deterministic parameters differ per run
            samples.update({k: v[:, None].expand((-1, z.shape[1]) + v.shape[1:]) for k, v in fixed.items()})
            det, predictor = {}, predict_params
        elif not self._mean_only:
            sites = list(zip(potential.names, potential.shapes, potential.transforms))
            approx = FlatApproximation(q, sites)
        if has_batchnorm(model.net):
            predictor = predict_bn_refresh
        info = {**info, "rank": self.rank, "scale": self.scale}
        return Posterior(
            model, samples, data=data, method=self.name, fixed=det, approximation=approx, predictor=predictor, info=info
        )

    def fit(self, model, data: Data) -> Posterior:
        model = require_bnn(model, self.name)
        with seeded(self.seed):
            potential, moments, fixed, info = self._run(model, data, 1, self.name.upper())
            return self._posterior(model, data, potential, moments, fixed, info, self.num_samples)


@register("swa")
class SWA(SWAG):
    """Stochastic weight averaging (Izmailov et al. 2018): the mean of the SGD iterates, one draw.

    Same options as :class:`SWAG` (``rank``, ``scale`` and ``num_samples`` are unused).

    Example:
        >>> import pbnn
        >>> pbnn.infer.SWA(start=1000, num_steps=1500).start
        1000
    """

    name = "swa"
    _mean_only = True


@register("multiswag")
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

    name = "multiswag"

    def __init__(
        self,
        num_members: int = 3,
        rank: int = 20,
        scale: float = 0.5,
        start: int = 3000,
        num_steps: int = 4000,
        collect_every: int | None = None,
        lr: float = 0.01,
        swag_lr: float = 0.003,
        momentum: float = 0.9,
        batch_size: int | None = None,
        num_samples: int = 20,
        accumulate: int = 1,
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        self.num_members = check_positive_int("num_members", num_members)
        super().__init__(
            rank,
            scale,
            start,
            num_steps,
            collect_every,
            lr,
            swag_lr,
            momentum,
            batch_size,
            num_samples,
            accumulate,
            seed,
            progress,
        )

    def fit(self, model, data: Data) -> Posterior:
        model = require_bnn(model, self.name)
        with seeded(distributed.broadcast_seed(self.seed)):
            potential, moments, fixed, info = self._run(model, data, self.num_members, "MultiSWAG")
            post = self._posterior(model, data, potential, moments, fixed, info, self.num_samples)
        post.info["num_members"] = self.num_members
        return post
