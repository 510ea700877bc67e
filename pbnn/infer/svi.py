"""Stochastic variational inference with Pyro's autoguides.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(40, 1); y = x[:, 0] + 0.1 * torch.randn(40)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="svi", num_steps=500, progress=False, seed=0)
    >>> post.samples["weight"].shape
    torch.Size([1, 1000, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.infer import autoguide
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, biject_to

from pbnn.core.options import option, optional, positive, positive_int
from pbnn.core.potential import Potential
from pbnn.engine.optim import decay, fitted_params, optimise, run_svi
from pbnn.infer.base import Backend, OptimOptions, RunOptions, register
from pbnn.infer.reparam import ESTIMATORS
from pbnn.infer.reparam import negative_elbo as local_negative_elbo
from pbnn.posterior.approx import FlatApproximation, LazyDraws
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import has_batchnorm, predict_bn_refresh

__all__ = ["SVI"]

GUIDES = ("mean_field", "low_rank", "full_rank")


def _detached_posterior(guide) -> torch.distributions.Distribution:
    """The guide's q(z) over the flat unconstrained latent, detached from the param store."""
    q = guide.get_posterior()
    if isinstance(q, Independent):
        return Independent(Normal(q.base_dist.loc.detach(), q.base_dist.scale.detach()), 1)
    if isinstance(q, LowRankMultivariateNormal):
        return LowRankMultivariateNormal(q.loc.detach(), q.cov_factor.detach(), q.cov_diag.detach())
    return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach())


def flat_approximation(guide) -> FlatApproximation:
    """Describe a fitted AutoContinuous guide as a :class:`FlatApproximation`."""
    sites = [
        (name, guide._unconstrained_shapes[name], biject_to(site["fn"].support))
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    ]
    return FlatApproximation(_detached_posterior(guide), sites)


@register("svi")
@dataclass(frozen=True, kw_only=True)
class SVI(Backend, RunOptions, OptimOptions):
    """Variational inference: maximise the ELBO of a Gaussian guide with Adam.

    Args:
        guide: ``"mean_field"`` (diagonal Gaussian, ``AutoDiagonalNormal``), ``"low_rank"``
            (``AutoLowRankMultivariateNormal``) or ``"full_rank"`` (``AutoMultivariateNormal``).
            All are Gaussian in the unconstrained space of the latent sites.
        num_particles: Monte Carlo samples per ELBO estimate.
        rank: rank of the low-rank guide (default: about sqrt(D), at most 20).
        init_scale: initial standard deviation of the guide. Small (3e-3) so the fit starts
            near the network's own initialisation and learns the mean before the spread, but
            not so small that the spread cannot grow within the default run. Measured on
            ``pbnn.bench.run_task`` splits (test NLL, seeds 0 / 1): diabetes 7.4 / 3.9 with 1e-3,
            1.24 / 1.21 with 3e-3, 1.16 / 1.19 with 1e-2; Friedman 0.9 / 1.6, 0.10 / 0.00,
            0.16 / 0.10; while 1e-2 underfits the 1-D gap demo (RMSE 0.43 against 0.32).
        num_samples: draws stored in the Posterior (more can be made from the fitted guide).
        estimator: gradient estimator of the ELBO's likelihood term. ``"reparam"`` (default):
            one weight sample per minibatch. ``"local_reparam"`` (local reparameterisation)
            or ``"flipout"``: per-example weight noise in ``nn.Linear`` / ``nn.Conv1d/2d/3d``
            layers, for lower-variance gradients; mean-field guide and ``pbnn.BNN`` only.
            The posterior and the predictions are drawn the same way for all three; see
            ``docs/svi.md``.
        others: as in ``OptimOptions`` and ``RunOptions`` (Adam, ``lr`` decaying 10x, gradient
            norm clipped at 10; checkpoints: BNN models only).

    A :class:`pbnn.BNN` is fitted on its functional potential (the same ELBO as Pyro's
    ``Trace_ELBO`` with this autoguide, several times faster per step) by
    :func:`pbnn.engine.optim.optimise`; a hand-written Pyro model by Pyro's SVI
    (ClippedAdam) through :func:`pbnn.engine.optim.run_svi`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SVI(guide="full_rank", num_steps=2000).guide
        'full_rank'
    """

    guide: str = "mean_field"
    num_particles: int = option(1, positive_int)
    rank: int | None = option(None, optional(positive_int))
    init_scale: float = option(3e-3, positive)
    num_samples: int = option(1000, positive_int)
    estimator: str = "reparam"

    def validate(self) -> None:
        super().validate()
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; choose one of {GUIDES}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        if self.estimator != "reparam" and self.guide != "mean_field":
            raise ValueError(
                f"estimator={self.estimator!r} needs the mean-field guide (independent Gaussian weights), got "
                f"guide={self.guide!r}; use guide='mean_field' or estimator='reparam'"
            )

    def _make_guide(self, potential: Potential):
        model = potential.model
        init = autoguide.init_to_median
        if potential.kind == "bnn":  # the network's own initialisation breaks hidden-unit symmetry
            init = autoguide.init_to_value(values=model.init_values(), fallback=autoguide.init_to_median)
        common = {"init_loc_fn": init, "init_scale": self.init_scale}
        if self.guide == "mean_field":
            return autoguide.AutoDiagonalNormal(model, **common)
        if self.guide == "full_rank":
            return autoguide.AutoMultivariateNormal(model, **common)
        guide = autoguide.AutoLowRankMultivariateNormal(model, rank=self.rank or 1, **common)
        if self.rank is None:  # pick the rank once the latent dimension is known
            guide._setup_prototype(*potential.data.head())
            guide.rank = max(1, min(20, int(round(guide.latent_dim**0.5))))
        return guide

    def run(self, potential: Potential) -> Posterior:
        batch = self.resolved_batch_size(len(potential))
        desc = f"SVI ({self.guide})"
        if potential.kind != "bnn":
            potential.require(self.name, minibatch=batch is not None)
            if self.estimator != "reparam":
                raise ValueError(
                    f"estimator={self.estimator!r} needs a pbnn.BNN model (it samples the layers' outputs); "
                    "use estimator='reparam' for a hand-written Pyro model"
                )
        guide = self._make_guide(potential)
        if potential.kind == "bnn":
            negative_elbo, params, fixed = self._objective(potential, guide)
            losses = optimise(
                params,
                negative_elbo,
                num_steps=self.num_steps,
                lr=decay(self.lr, self.num_steps),
                n=len(potential),
                scale=len(potential),
                desc=desc,
                loss_name="-elbo/N",
                data=potential.data,
                **self.optim_args(len(potential)),
            )
            fixed = {k: v.detach() for k, v in fixed.items()}
        else:
            data = potential.data
            losses = run_svi(
                potential.model,
                guide,
                data,
                num_steps=self.num_steps,
                lr=self.lr,
                batch_size=batch,
                num_particles=self.num_particles,
                accumulate=self.accumulate,
                checkpoint_path=self.checkpoint_path,
                desc=desc,
                progress=self.progress,
            )
            fixed = fitted_params(guide._pyro_name)
        approx = flat_approximation(guide)
        samples = LazyDraws.from_rng(approx, self.num_samples)  # drawn on demand, not stored
        info = {"losses": losses, "guide": self.guide, "estimator": self.estimator}
        # BatchNorm: each weight draw gets the statistics of the training inputs under it
        bn = potential.kind == "bnn" and has_batchnorm(potential.model.net)
        return self.posterior(
            potential,
            samples,
            fixed=fixed,
            approximation=approx,
            predictor=predict_bn_refresh if bn else None,
            info=info,
        )

    def _objective(self, potential: Potential, guide):
        """``(negative_elbo(idx), parameters to optimise, deterministic weights)`` of a BNN.

        For an AutoContinuous guide, Trace_ELBO's estimate is
        ``log p(theta(z), y) + log|J(z)| - log q(z)`` at ``z ~ q``: exactly this.
        """
        guide(*potential.data.head())  # create the guide's parameters (in this fit's private scope)
        order = [n for n, _ in guide.prototype_trace.iter_stochastic_nodes() if n in guide._unconstrained_shapes]
        potential = potential.with_order(order)
        fixed = {n: v.detach().clone().requires_grad_(True) for n, v in potential.fixed.items()}
        params = [p for p in guide.parameters()] + list(fixed.values())

        def negative_elbo(idx):
            q = guide.get_posterior()
            z = q.rsample((self.num_particles,))
            log_p = potential.log_joint_batch(z, idx, fixed)
            return -(log_p - q.log_prob(z)).mean()

        if self.estimator != "reparam":  # per-example weight noise in Linear / Conv layers
            negative_elbo = local_negative_elbo(
                potential, guide.get_posterior, fixed, self.estimator, self.num_particles
            )
        return negative_elbo, params, fixed
