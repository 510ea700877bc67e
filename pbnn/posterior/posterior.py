"""``pbnn.Posterior``: what every backend returns.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="map", num_steps=300, progress=False)
    >>> post.samples["weight"].shape        # [chain, draw, *shape]
    torch.Size([1, 1, 1, 1])
    >>> post.predict(x).mean.shape
    torch.Size([20])
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pbnn.core.data import Data, check_inputs
from pbnn.core.model import BNN
from pbnn.posterior.approx import Approximation
from pbnn.posterior.predictive import Prediction, predict_bnn, predict_pyro

__all__ = ["Posterior"]


class Posterior:
    """Posterior draws of a model's latent sites, whatever backend produced them.

    Attributes:
        model: the :class:`pbnn.BNN` or hand-written Pyro model that was fitted.
        samples: ``{site: tensor [chain, draw, *shape]}`` in the constrained space.
        sample_stats: ``{stat: tensor [chain, draw]}`` (may be empty).
        fixed: values of deterministic parameters (``pyro.param`` sites) after the fit.
        data: the training :class:`pbnn.data.Data` (for ArviZ's observed data and LOO).
        method: the backend's name.
        approximation: the fitted distribution, a :class:`pbnn.approx.Approximation` (draws,
            log density, mean, ``J Sigma J^T``), when the backend fitted one (SVI, Laplace,
            SWAG), so more draws can be made; else None.
        predictor: optional ``predictor(posterior, draws, x) -> Prediction`` for backends
            whose predictive is not "evaluate the model at each draw" (e.g. a linearised
            Laplace predictive). Must be picklable (a module-level function or object) for
            :meth:`save`.
        info: backend-specific extras (loss traces, timings, ...).
    """

    def __init__(
        self,
        model,
        samples: dict[str, torch.Tensor],
        *,
        data: Data,
        method: str,
        sample_stats: dict[str, torch.Tensor] | None = None,
        fixed: dict[str, torch.Tensor] | None = None,
        approximation: Approximation | None = None,
        predictor: Callable[[Posterior, dict[str, torch.Tensor], torch.Tensor], Prediction] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        shapes = {tuple(v.shape[:2]) for v in samples.values()}
        if len(shapes) != 1:
            raise ValueError(f"all sites need the same [chain, draw] dims, got {shapes}")
        for name, v in samples.items():
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"posterior draws of site {name!r} contain NaN or inf: the fit diverged; "
                    "lower the learning rate / step size or standardise the data"
                )
        self.model = model
        self.samples = {k: v.detach() for k, v in samples.items()}
        self.sample_stats = dict(sample_stats or {})
        self.fixed = {k: v.detach() for k, v in (fixed or {}).items()}
        self.data = data
        self.method = method
        self.approximation = approximation
        self.predictor = predictor
        self.info = dict(info or {})

    # ------------------------------------------------------------------ shape
    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    def flat_samples(self) -> dict[str, torch.Tensor]:
        """Draws with chains concatenated: ``{site: [chain * draw, *shape]}``."""
        return {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in self.samples.items()}

    def _draws(self, num_samples: int | None, seed: int | None) -> dict[str, torch.Tensor]:
        flat = self.flat_samples()
        total = self.num_chains * self.num_draws
        if num_samples is None or num_samples == total:
            return flat
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_samples < total:  # evenly spaced: deterministic and spread over all chains
            idx = torch.linspace(0, total - 1, num_samples).round().long()
            return {k: v[idx] for k, v in flat.items()}
        if self.approximation is None:
            raise ValueError(
                f"asked for {num_samples} draws but this {self.method!r} posterior holds {total} and "
                "cannot make more; pass num_samples <= that"
            )
        return self.approximation.sample(num_samples, seed=seed)

    # ------------------------------------------------------------------ predictive
    def predict(self, x, num_samples: int | None = None, *, seed: int | None = 0) -> Prediction:
        """Posterior predictive at ``x``.

        Args:
            x: inputs ``[M, ...]``.
            num_samples: number of draws to use (default: all stored draws). Fewer are
                taken evenly spaced; more are drawn fresh when the posterior keeps a fitted
                distribution (SVI, Laplace).
            seed: seed for fresh draws.

        Raises:
            ValueError: when the rows of ``x`` do not have the shape of the training inputs
                (e.g. a different number of features, or 1-D ``x`` for a one-feature model:
                pass ``x[:, None]``), or ``x`` holds NaN / inf.
        """
        train = getattr(self.data, "x", None)
        x = check_inputs(x, train if isinstance(train, torch.Tensor) else None)
        draws = self._draws(num_samples, seed)
        if self.predictor is not None:
            return self.predictor(self, draws, x)
        if isinstance(self.model, BNN):
            return predict_bnn(self.model, draws, self.fixed, x)
        return predict_pyro(self.model, draws, self.fixed, x)

    def log_likelihood(self) -> torch.Tensor:
        """Pointwise log-likelihood of the training data, ``[chain, draw, N]``."""
        lp = self.predict(self.data.x).pointwise_log_likelihood(self.data.y)
        return lp.reshape(self.num_chains, self.num_draws, -1)

    def log_marginal_likelihood(self) -> float:
        """The backend's estimate of ``log p(y | x)`` for model comparison (e.g. Laplace's)."""
        value = self.info.get("log_marginal_likelihood")
        if value is None:
            raise ValueError(
                f"this {self.method!r} posterior has no marginal-likelihood estimate; fit with "
                "method='laplace' (and a Gaussian prior) to get one"
            )
        return float(value)

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(self):
        """ArviZ ``InferenceData`` with posterior, sample_stats, observed_data and log_likelihood."""
        from pbnn.posterior.arviz_io import to_inference_data

        return to_inference_data(self)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Save draws, stats, fitted parameters, data and (if picklable) the model."""
        state = {
            "samples": self.samples,
            "sample_stats": self.sample_stats,
            "fixed": self.fixed,
            "x": self.data.x,
            "y": self.data.y,
            "method": self.method,
            "approximation": self.approximation,
            "predictor": self.predictor,
            "info": self.info,
            "model": self.model,
        }
        try:
            torch.save(state, path)
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # e.g. a lambda or closure model
            if state["model"] is None:
                raise
            state["model"] = None
            torch.save(state, path)
            self.info.setdefault("save_warning", f"model not saved ({e}); pass model= to Posterior.load")

    @classmethod
    def load(cls, path: str | Path, model=None) -> Posterior:
        """Load a saved Posterior; pass ``model`` when the model could not be pickled.

        Only load files you trust: this unpickles the model object.
        """
        state = torch.load(path, weights_only=False)
        model = model if model is not None else state["model"]
        if model is None:
            raise ValueError("this file holds no model (it was not picklable); pass model= to Posterior.load")
        return cls(
            model,
            state["samples"],
            data=Data(state["x"], state["y"]),
            method=state["method"],
            sample_stats=state["sample_stats"],
            fixed=state["fixed"],
            approximation=state["approximation"],
            predictor=state.get("predictor"),
            info=state["info"],
        )

    def __repr__(self) -> str:
        sites = len(self.samples)
        size = sum(math.prod(v.shape[2:]) for v in self.samples.values())
        return (
            f"Posterior(method={self.method!r}, chains={self.num_chains}, draws={self.num_draws}, "
            f"sites={sites}, dims={size})"
        )
