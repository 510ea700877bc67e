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

import pyro
from pyro.infer import autoguide

from pbnn.core.data import Data
from pbnn.engine.distributed import broadcast_seed, is_active
from pbnn.infer.base import accepts_subsample, Backend, check_positive, check_positive_int, register
from pbnn.core.model import BNN
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import fitted_params, resolve_batch_size, run_adam, run_svi, seeded

__all__ = ["MAP"]


@register("map")
class MAP(Backend):
    """Maximum a posteriori weights (Adam on the negative log joint); a one-draw Posterior.

    Args:
        num_steps: Adam steps.
        lr: learning rate (decays 10x over the run, as for :class:`pbnn.infer.SVI`).
        batch_size: minibatch size; None: full batch up to 2048 points, else 256.
        seed: seed for initialisation and minibatches (None: torch's global RNG).
        accumulate: gradient accumulation: split each minibatch into this many micro-batches
            (same update, less memory).
        checkpoint_path, checkpoint_every: write a checkpoint every that many steps and resume
            from the file when it exists (BNN models).
        progress: show a tqdm bar.

    Example:
        >>> import pbnn
        >>> pbnn.infer.MAP(num_steps=100).num_steps
        100
    """

    name = "map"

    def __init__(
        self,
        num_steps: int = 3000,
        lr: float = 0.01,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        accumulate: int = 1,
        checkpoint_path: str | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.lr = check_positive("lr", lr)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.accumulate = check_positive_int("accumulate", accumulate)
        if (checkpoint_path is None) != (checkpoint_every is None):
            raise ValueError("pass both checkpoint_path and checkpoint_every (or neither)")
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every

    def fit(self, model, data: Data) -> Posterior:
        batch = resolve_batch_size(self.batch_size, len(data))
        if not isinstance(model, BNN) and (self.accumulate > 1 or self.checkpoint_path or is_active()):
            raise ValueError(
                "gradient accumulation, checkpoints and data-parallel training need a pbnn.BNN model; "
                "hand-written Pyro models are trained by pyro.infer.SVI in one process"
            )
        if isinstance(model, BNN):
            with seeded(broadcast_seed(self.seed)):
                mode, fixed, losses = self._fit_functional(model, data, batch)
        else:
            if batch is not None and not accepts_subsample(model):
                raise ValueError("minibatch MAP needs the model to accept subsample=; pass batch_size >= len(x)")
            with seeded(broadcast_seed(self.seed)), pyro.get_param_store().scope():
                guide = autoguide.AutoDelta(model, init_loc_fn=autoguide.init_to_median)
                losses = run_svi(
                    model,
                    guide,
                    data,
                    num_steps=self.num_steps,
                    lr=self.lr,
                    batch_size=batch,
                    desc="MAP",
                    progress=self.progress,
                )
                mode = guide.median(data.x, data.y)
                fixed = fitted_params(guide._pyro_name)
        samples = {k: v.detach()[None, None] for k, v in mode.items()}
        return Posterior(model, samples, data=data, method=self.name, fixed=fixed, info={"losses": losses})

    def _fit_functional(self, model: BNN, data: Data, batch: int | None):
        """Adam on the BNN's functional log joint (no Jacobian: the mode of the constrained
        density, as Pyro's AutoDelta defines MAP), starting from the network's own init."""
        potential = Potential(model, data)
        z = potential.initial_z().requires_grad_(True)
        fixed = {
            n: p.detach().clone().requires_grad_(True)
            for n, p in model.net.named_parameters()
            if n in model.deterministic_names
        }
        losses = run_adam(
            [z, *fixed.values()],
            lambda idx: -potential.log_joint(z, idx, fixed, jacobian=False),
            num_steps=self.num_steps,
            lr=self.lr,
            n=len(data),
            batch_size=batch,
            desc="MAP",
            progress=self.progress,
            accumulate=self.accumulate,
            checkpoint_path=self.checkpoint_path,
            checkpoint_every=self.checkpoint_every,
            loss_name="-log joint/N",
        )
        mode, _ = potential.unpack(z.detach())
        return mode, {k: v.detach() for k, v in fixed.items()}, losses
