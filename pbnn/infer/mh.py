"""Random-walk Metropolis-Hastings (:mod:`pbnn.kernels.mh`): the textbook baseline for small
models. It needs ``O(D)`` steps per independent draw: use NUTS for BNNs.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0] + 0.5 * torch.randn(30)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    >>> post = pbnn.fit(model, x, y, method="mh", num_samples=100, warmup=200, thinning=1, init="net",
    ...                 progress=False, seed=0, warn=False)
    >>> post.samples["weight"].shape, 0 < float(post.sample_stats["acceptance_rate"].mean()) < 1
    (torch.Size([4, 100, 1, 1]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch

from pbnn.core.options import nonneg_int, option, positive, positive_int, probability
from pbnn.engine import chains, distributed
from pbnn.infer.base import Backend, ChainOptions, RunOptions, register
from pbnn.kernels.mh import TARGET_ACCEPT

__all__ = ["MH"]


@register("mh")
@dataclass(frozen=True, kw_only=True)
class MH(Backend, RunOptions, ChainOptions):
    """Random-walk Metropolis-Hastings with scale adaptation during warm-up.

    Args:
        thinning: keep every ``thinning``-th draw (default 10: random-walk draws are strongly
            autocorrelated; formerly ``thin``).
        proposal_scale: initial proposal scale in the unconstrained space (formerly ``init_scale``).
        target_accept: acceptance rate the scale adaptation aims at (0.234, optimal for
            random-walk proposals in many dimensions).
        batch_size: must stay None: MH is full-batch (see ``method="sgld"``).
        others: as for :class:`pbnn.infer.NUTS` (``init`` default ``"map"``: random-walk chains
            are too slow to find a mode on their own).

    Example:
        >>> import pbnn
        >>> pbnn.infer.MH(thinning=5).thinning
        5
    """

    full_batch = True

    renamed = {"thin": "thinning", "init_scale": "proposal_scale"}
    num_samples: int = option(1000, positive_int)
    warmup: int = option(2000, nonneg_int)
    thinning: int = option(10, positive_int)
    proposal_scale: float = option(0.1, positive)
    target_accept: float = option(TARGET_ACCEPT, probability)
    batch_size: None = None

    def validate(self) -> None:
        super().validate()
        chains.check_chain_options(self)

    def run(self, potential):
        gen = chains.chain_generator(potential.initial_z().device)
        with pyro.validation_enabled(False), torch.no_grad():
            z0, fixed = self.start_chains(potential, gen)

            def run(z0, gen):
                return chains.sample_mh(
                    lambda z: potential.log_joint_batch(z, None, fixed),
                    z0,
                    num_samples=self.num_samples,
                    warmup=self.warmup,
                    thinning=self.thinning,
                    proposal_scale=self.proposal_scale,
                    target_accept=self.target_accept,
                    generator=gen,
                    progress=self.progress,
                    desc=f"MH ({len(z0)} chains)",
                )

            result = distributed.run_batched_chains(run, z0, gen)
        return self.chain_posterior(potential, result, fixed, "MH")
