"""Deep ensembles (Lakshminarayanan, Pritzel and Blundell, NeurIPS 2017).

``num_members`` MAP fits from independent random initialisations (optionally each on a
bootstrap resample of the data); every member is one posterior draw, stored as its own
chain (``samples[site]`` is ``[member, 1, *shape]``). With a learned Gaussian noise scale
each member estimates its own ``sigma``, so the predictive is the mixture of the members'
Gaussians, as in the paper.

The members are trained by one optimiser over the stacked member vectors (``[M, D]``); Adam
acts elementwise and gradients are clipped per member, so this is the same as training
them one after another (sequentially, in this process). With ``pbnn.fit(..., distributed=True)``
under ``torchrun`` the members are spread over the ranks and gathered (:mod:`pbnn.distributed`).

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="ensemble", num_members=3, num_steps=100,
    ...                 progress=False, seed=0)
    >>> post.samples["0.weight"].shape        # [member, 1, *shape]
    torch.Size([3, 1, 8, 1])
"""

from __future__ import annotations

import torch

from pbnn.engine import distributed
from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_positive, check_positive_int, register
from pbnn.engine.pointfit import decaying_lr, initial_points, predict_params, require_bnn, train_points
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import resolve_batch_size, seeded

__all__ = ["DeepEnsemble"]


@register("ensemble")
class DeepEnsemble(Backend):
    """An ensemble of independently initialised MAP fits; each member is one draw (chain = member).

    Args:
        num_members: ensemble size (the paper uses 5).
        num_steps, lr, batch_size: per-member training, as :class:`pbnn.infer.MAP` (Adam,
            learning rate decaying 10x over the run, gradient norm clipped at 10).
        bootstrap: train each member on a bootstrap resample of the data (Breiman's
            bagging; the paper found it hurts, so off by default).
        accumulate: average gradients over this many minibatches per step.
        seed: seed for initialisations, minibatches and bootstrap draws.
        progress: show a tqdm bar.

    Example:
        >>> import pbnn
        >>> pbnn.infer.DeepEnsemble(num_members=10).num_members
        10
    """

    name = "ensemble"

    def __init__(
        self,
        num_members: int = 5,
        num_steps: int = 3000,
        lr: float = 0.01,
        batch_size: int | None = None,
        bootstrap: bool = False,
        accumulate: int = 1,
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        self.num_members = check_positive_int("num_members", num_members)
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.lr = check_positive("lr", lr)
        self.batch_size = batch_size
        if not isinstance(bootstrap, bool):
            raise ValueError(f"bootstrap must be True or False, got {bootstrap!r}")
        self.bootstrap = bootstrap
        self.accumulate = check_positive_int("accumulate", accumulate)
        self.seed = seed
        self.progress = progress

    def fit(self, model, data: Data) -> Posterior:
        model = require_bnn(model, self.name)
        batch = resolve_batch_size(self.batch_size, len(data))
        potential = Potential(model, data)
        with seeded(distributed.broadcast_seed(self.seed)):
            base = int(torch.randint(0, 2**31 - 1, ()).item())
            z0, fixed0 = initial_points(model, potential, [base + m for m in range(self.num_members)])
            weights = None
            if self.bootstrap:  # resample counts: member m sees point i weights[m, i] times
                n = len(data)
                idx = torch.randint(0, n, (self.num_members, n))
                weights = torch.zeros(self.num_members, n).scatter_add_(1, idx, torch.ones(self.num_members, n))
            # distributed: every rank draws all members' starts and trains its block of them
            mine = distributed.chain_slice(self.num_members, every_rank=True)
            z0, fixed0 = z0[mine], {k: v[mine] for k, v in fixed0.items()}
            weights = None if weights is None else weights[mine]
            z, fixed, losses = train_points(
                potential,
                z0,
                fixed0,
                num_steps=self.num_steps,
                lr=decaying_lr(self.lr, self.num_steps),
                batch_size=batch,
                accumulate=self.accumulate,
                weights=weights,
                desc=f"ensemble ({self.num_members} members)",
                progress=self.progress,
            )
            z, fixed = distributed.gather_chains((z, fixed))
            losses = distributed.mean_over_chains(losses, len(z0))
        values, _ = potential.unpack(z)
        samples = {k: v[:, None] for k, v in values.items()}
        info = {"losses": losses, "num_members": self.num_members, "bootstrap": self.bootstrap}
        if fixed:  # deterministic parameters differ per member: store them per draw too
            samples.update({k: v[:, None] for k, v in fixed.items()})
            return Posterior(model, samples, data=data, method=self.name, predictor=predict_params, info=info)
        return Posterior(model, samples, data=data, method=self.name, info=info)
