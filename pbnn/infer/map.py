"""MAP: the non-Bayesian baseline, a point estimate at the mode of the posterior.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(40, 1); y = 3 * x[:, 0]
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="map", num_steps=500, lr=0.05, progress=False, seed=0)
    >>> round(float(post.samples["weight"].squeeze()), 1)
    3.0
"""

from __future__ import annotations

from dataclasses import dataclass

from pyro.infer import autoguide

from pbnn.core.potential import Potential
from pbnn.engine.optim import fit_map, fitted_params, run_svi
from pbnn.infer.base import Backend, OptimOptions, RunOptions, register
from pbnn.posterior.posterior import Posterior

__all__ = ["MAP"]


@register("map")
@dataclass(frozen=True, kw_only=True)
class MAP(Backend, RunOptions, OptimOptions):
    """Maximum a posteriori weights (Adam on the negative log joint); a one-draw Posterior.

    A :class:`pbnn.BNN` is fitted by :func:`pbnn.engine.optim.fit_map` from the network's own
    initialisation (the mode of the constrained density, as Pyro's ``AutoDelta`` defines
    MAP); a hand-written Pyro model by Pyro's SVI with an ``AutoDelta`` guide.

    Options: as in ``OptimOptions`` and ``RunOptions`` (``lr`` decays 10x over the run;
    checkpoints: BNN models only).

    Example:
        >>> import pbnn
        >>> pbnn.infer.MAP(num_steps=100).num_steps
        100
    """

    def run(self, potential: Potential) -> Posterior:
        n = len(potential)
        batch = self.resolved_batch_size(n)
        if potential.kind == "bnn":
            z, fixed, losses = fit_map(potential, num_steps=self.num_steps, lr=self.lr, **self.optim_args(n))
            mode = potential.layout.constrain(z)
        else:
            potential.require(self.name, minibatch=batch is not None)
            guide = autoguide.AutoDelta(potential.model, init_loc_fn=autoguide.init_to_median)
            losses = run_svi(
                potential.model,
                guide,
                potential.data,
                num_steps=self.num_steps,
                lr=self.lr,
                batch_size=batch,
                accumulate=self.accumulate,
                checkpoint_path=self.checkpoint_path,
                desc="MAP",
                progress=self.progress,
            )
            mode = guide.median(potential.data.x, potential.data.y)
            fixed = fitted_params(guide._pyro_name)
        samples = {k: v.detach()[None, None] for k, v in mode.items()}
        return self.posterior(potential, samples, fixed=fixed, info={"losses": losses})
