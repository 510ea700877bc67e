"""Deep ensembles (Lakshminarayanan, Pritzel and Blundell, NeurIPS 2017): ``num_members`` MAP
fits from independent random initialisations, each one draw stored as its own chain
(``docs/imitation.md``). A hand-written Pyro model works too: the members are points over its
latent sites, started as :func:`pbnn.engine.optim.initial_points` describes.

The members are trained by one optimiser over the stacked member vectors (``[M, D]``) through
:func:`pbnn.engine.optim.fit_points` (per-member objective and clipping, so the same as training
them one after another), not ``fit_map``, whose batched mode targets the samplers' unconstrained
density.

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

from dataclasses import dataclass

import torch

from pbnn.core.options import boolean, option, positive_int
from pbnn.core.potential import Potential
from pbnn.engine import distributed
from pbnn.engine.optim import decay, fit_points, initial_points
from pbnn.infer.base import Backend, OptimOptions, RunOptions, register
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import has_batchnorm, predict_bn_refresh, predict_params

__all__ = ["DeepEnsemble"]


@register("ensemble")
@dataclass(frozen=True, kw_only=True)
class DeepEnsemble(Backend, RunOptions, OptimOptions):
    """An ensemble of independently initialised MAP fits; each member is one draw (chain = member).

    Args:
        num_members: ensemble size (the paper uses 5).
        num_steps, lr, batch_size: per-member training, as :class:`pbnn.infer.MAP` (Adam,
            learning rate decaying 10x over the run; each member's gradient per data point
            clipped at norm 10).
        bootstrap: train each member on a bootstrap resample of the data (Breiman's
            bagging; the paper found it hurts, so off by default).
        others: as in ``OptimOptions`` and ``RunOptions``.

    Example:
        >>> import pbnn
        >>> pbnn.infer.DeepEnsemble(num_members=10).num_members
        10
    """

    num_members: int = option(5, positive_int)
    bootstrap: bool = option(False, boolean)

    def run(self, potential: Potential) -> Posterior:
        n, num = len(potential), self.num_members
        potential.require(self.name, minibatch=self.resolved_batch_size(n) is not None)
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        z0, fixed0 = initial_points(potential, [base + m for m in range(num)])
        weights = None
        if self.bootstrap and potential.kind != "bnn":
            raise ValueError(
                "bootstrap=True weights each data point's likelihood and needs a pbnn.BNN; for a hand-written "
                "Pyro model use bootstrap=False"
            )
        if self.bootstrap:  # resample counts: member m sees point i weights[m, i] times
            idx = torch.randint(0, n, (num, n))
            weights = torch.zeros(num, n).scatter_add_(1, idx, torch.ones(num, n)).to(z0)  # counts: exact in any dtype
        # distributed: every rank draws all members' starts and trains its block of them
        mine = distributed.chain_slice(num, every_rank=True)
        z, fixed, losses = fit_points(
            potential,
            z0[mine],
            {k: v[mine] for k, v in fixed0.items()},
            num_steps=self.num_steps,
            lr=decay(self.lr, self.num_steps),
            weights=None if weights is None else weights[mine],
            desc=f"ensemble ({num} members)",
            **self.optim_args(n),
        )
        losses = distributed.mean_over_chains(losses, len(z))
        z, fixed = distributed.gather_chains((z, fixed))
        samples = {k: v[:, None] for k, v in potential.layout.constrain(z).items()}
        info = {"losses": losses, "num_members": num, "bootstrap": self.bootstrap}
        predictor = None
        if fixed:  # deterministic parameters differ per member: store them per draw too
            samples.update({k: v[:, None] for k, v in fixed.items()})
            predictor = predict_params
        # each member gets its own BatchNorm statistics
        if potential.kind == "bnn" and has_batchnorm(potential.model.net):
            predictor = predict_bn_refresh
        return self.posterior(potential, samples, predictor=predictor, info=info)
