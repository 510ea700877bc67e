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

import pyro
import torch
from pyro.infer import autoguide
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    biject_to,
)

from pbnn.posterior.approx import FlatApproximation
from pbnn.core.data import Data
from pbnn.engine.distributed import broadcast_seed, is_active
from pbnn.infer.base import accepts_subsample, Backend, check_positive, check_positive_int, register
from pbnn.core.model import BNN
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.infer.reparam import ESTIMATORS
from pbnn.infer.reparam import negative_elbo as local_negative_elbo
from pbnn.engine.training import fitted_params, resolve_batch_size, run_adam, run_svi, seeded

__all__ = ["SVI"]

GUIDES = ("mean_field", "low_rank", "full_rank")


def init_loc_fn(model):
    """Start at the network's own initialisation (breaks hidden-unit symmetry), other sites at the prior median."""
    if isinstance(model, BNN):
        return autoguide.init_to_value(values=model.init_values(), fallback=autoguide.init_to_median)
    return autoguide.init_to_median


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
class SVI(Backend):
    """Variational inference: maximise the ELBO of a Gaussian guide with Adam.

    Args:
        guide: ``"mean_field"`` (diagonal Gaussian, ``AutoDiagonalNormal``), ``"low_rank"``
            (``AutoLowRankMultivariateNormal``) or ``"full_rank"`` (``AutoMultivariateNormal``).
            All are Gaussian in the unconstrained space of the latent sites.
        num_steps: optimisation steps.
        lr: Adam learning rate; it decays by 10x over the run (ClippedAdam, clip norm 10).
        batch_size: minibatch size. None: full batch up to 2048 points, else 256.
        num_particles: Monte Carlo samples per ELBO estimate.
        rank: rank of the low-rank guide (default: about sqrt(D), at most 20).
        init_scale: initial standard deviation of the guide. Small (3e-3) so the fit starts
            near the network's own initialisation and learns the mean before the spread, but
            not so small that the spread cannot grow within the default run. Measured on
            ``pbnn.bench.run_task`` splits (test NLL, seeds 0 / 1): diabetes 7.4 / 3.9 with 1e-3,
            1.24 / 1.21 with 3e-3, 1.16 / 1.19 with 1e-2; Friedman 0.9 / 1.6, 0.10 / 0.00,
            0.16 / 0.10; while 1e-2 underfits the 1-D gap demo (RMSE 0.43 against 0.32).
        num_samples: draws stored in the Posterior (more can be made from the fitted guide).
        seed: seed for initialisation, minibatches and draws (None: torch's global RNG).
        accumulate: gradient accumulation: split each minibatch into this many micro-batches
            (same update, less memory).
        checkpoint_path, checkpoint_every: write a checkpoint every that many steps and resume
            from the file when it exists (BNN models).
        progress: show a tqdm bar with the current -ELBO per data point.
        estimator: gradient estimator of the ELBO's likelihood term. ``"reparam"`` (default):
            one weight sample per minibatch. ``"local_reparam"`` (local reparameterisation)
            or ``"flipout"``: per-example weight noise in ``nn.Linear`` / ``nn.Conv1d/2d/3d``
            layers, for lower-variance gradients; mean-field guide and ``pbnn.BNN`` only.
            The posterior and the predictions are drawn the same way for all three; see
            ``docs/svi.md``.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SVI(guide="full_rank", num_steps=2000).guide
        'full_rank'
    """

    name = "svi"

    def __init__(
        self,
        guide: str = "mean_field",
        num_steps: int = 3000,
        lr: float = 0.01,
        batch_size: int | None = None,
        num_particles: int = 1,
        rank: int | None = None,
        init_scale: float = 3e-3,
        num_samples: int = 1000,
        seed: int | None = None,
        progress: bool = True,
        accumulate: int = 1,
        checkpoint_path: str | None = None,
        checkpoint_every: int | None = None,
        estimator: str = "reparam",
    ) -> None:
        if guide not in GUIDES:
            raise ValueError(f"unknown guide {guide!r}; choose one of {GUIDES}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        if estimator != "reparam" and guide != "mean_field":
            raise ValueError(
                f"estimator={estimator!r} needs the mean-field guide (independent Gaussian weights), got "
                f"guide={guide!r}; use guide='mean_field' or estimator='reparam'"
            )
        self.estimator = estimator
        self.guide = guide
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.lr = check_positive("lr", lr)
        self.batch_size = batch_size
        self.num_particles = check_positive_int("num_particles", num_particles)
        self.rank = rank
        self.init_scale = check_positive("init_scale", init_scale)
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.seed = seed
        self.progress = progress
        self.accumulate = check_positive_int("accumulate", accumulate)
        if (checkpoint_path is None) != (checkpoint_every is None):
            raise ValueError("pass both checkpoint_path and checkpoint_every (or neither)")
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every

    def _make_guide(self, model, data: Data):
        common = {"init_loc_fn": init_loc_fn(model), "init_scale": self.init_scale}
        if self.guide == "mean_field":
            return autoguide.AutoDiagonalNormal(model, **common)
        if self.guide == "full_rank":
            return autoguide.AutoMultivariateNormal(model, **common)
        guide = autoguide.AutoLowRankMultivariateNormal(model, rank=self.rank or 1, **common)
        if self.rank is None:  # pick the rank once the latent dimension is known
            guide._setup_prototype(data.x, data.y)
            guide.rank = max(1, min(20, int(round(guide.latent_dim**0.5))))
        return guide

    def fit(self, model, data: Data) -> Posterior:
        batch = resolve_batch_size(self.batch_size, len(data))
        if not isinstance(model, BNN) and (self.accumulate > 1 or self.checkpoint_path or is_active()):
            raise ValueError(
                "gradient accumulation, checkpoints and data-parallel training need a pbnn.BNN model; "
                "hand-written Pyro models are trained by pyro.infer.SVI in one process"
            )
        if batch is not None and not isinstance(model, BNN) and not accepts_subsample(model):
            raise ValueError(
                "minibatch SVI needs the model to accept subsample= (see pbnn.api's site and plate "
                "convention); pass batch_size >= len(x) for full-batch training"
            )
        if self.estimator != "reparam" and not isinstance(model, BNN):
            raise ValueError(
                f"estimator={self.estimator!r} needs a pbnn.BNN model (it samples the layers' outputs); "
                "use estimator='reparam' for a hand-written Pyro model"
            )
        with seeded(broadcast_seed(self.seed)), pyro.get_param_store().scope():
            guide = self._make_guide(model, data)
            if isinstance(model, BNN):
                losses, fixed = self._fit_functional(model, guide, data, batch)
            else:
                losses = run_svi(
                    model,
                    guide,
                    data,
                    num_steps=self.num_steps,
                    lr=self.lr,
                    batch_size=batch,
                    num_particles=self.num_particles,
                    desc=f"SVI ({self.guide})",
                    progress=self.progress,
                )
                fixed = fitted_params(guide._pyro_name)
            approx = flat_approximation(guide)
            draws = approx.sample(self.num_samples)
        samples = {k: v.unsqueeze(0) for k, v in draws.items()}
        return Posterior(
            model,
            samples,
            data=data,
            method=self.name,
            fixed=fixed,
            approximation=approx,
            info={"losses": losses, "guide": self.guide, "estimator": self.estimator},
        )

    def _fit_functional(self, model: BNN, guide, data: Data, batch: int | None):
        """The same ELBO as ``Trace_ELBO`` with this autoguide, evaluated on the BNN's functional
        potential instead of Pyro traces (several times faster per step).

        For an AutoContinuous guide, Trace_ELBO's estimate is
        ``log p(theta(z), y) + log|J(z)| - log q(z)`` at ``z ~ q``: exactly this.
        """
        negative_elbo, params, fixed = self._objective(model, guide, data)
        losses = run_adam(
            params,
            negative_elbo,
            num_steps=self.num_steps,
            lr=self.lr,
            n=len(data),
            batch_size=batch,
            desc=f"SVI ({self.guide})",
            progress=self.progress,
            accumulate=self.accumulate,
            checkpoint_path=self.checkpoint_path,
            checkpoint_every=self.checkpoint_every,
            loss_name="-elbo/N",
        )
        return losses, {k: v.detach() for k, v in fixed.items()}

    def _objective(self, model: BNN, guide, data: Data):
        """``(negative_elbo(idx), parameters to optimise, deterministic weights)`` of the fast path."""
        guide(data.x, data.y)  # create the guide's parameters (in this fit's private scope)
        potential = Potential(
            model,
            data,
            order=[n for n, _ in guide.prototype_trace.iter_stochastic_nodes() if n in guide._unconstrained_shapes],
        )
        fixed = {
            n: p.detach().clone().requires_grad_(True)
            for n, p in model.net.named_parameters()
            if n in model.deterministic_names
        }
        params = [p for p in guide.parameters()] + list(fixed.values())

        def negative_elbo(idx):
            q = guide.get_posterior()
            z = q.rsample((self.num_particles,))
            log_p = potential.log_joint_batch(z, idx, fixed)
            return -(log_p - q.log_prob(z)).mean()

        if self.estimator != "reparam":  # per-example weight noise in Linear / Conv layers
            negative_elbo = local_negative_elbo(
                model, potential, guide.get_posterior, fixed, self.estimator, self.num_particles
            )
        return negative_elbo, params, fixed
