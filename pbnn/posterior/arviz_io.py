"""The one place pbnn builds an ArviZ object (``az.from_dict``; ArviZ 0.x and 1.x both handled).

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="map", num_steps=200, progress=False)
    >>> idata = pbnn.arviz_io.to_inference_data(post)
    >>> sorted(g for g in ("posterior", "log_likelihood", "observed_data") if g in idata.groups())
    ['log_likelihood', 'observed_data', 'posterior']
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np

__all__ = ["to_inference_data"]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_inference_data(post):
    """Convert a :class:`pbnn.Posterior` to ArviZ (``InferenceData`` or ``DataTree``).

    Groups: ``posterior`` (every latent site, dims ``[chain, draw, *shape]``),
    ``sample_stats`` (if the backend recorded any), ``observed_data`` (``obs``) and
    ``log_likelihood`` (``obs``: pointwise ``log p(y_i | theta)`` that pbnn computes itself,
    so ``az.loo`` and ``az.waic`` work for every backend).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    posterior = {k: _np(v) for k, v in post.samples.items()}
    groups = {
        "posterior": posterior,
        "log_likelihood": {"obs": _np(post.log_likelihood())},
        "observed_data": {"obs": _np(post.data.y)},
    }
    stats = {k: _np(v) for k, v in post.sample_stats.items()}
    if stats:
        groups["sample_stats"] = stats
    n = post.data.y.shape[0]
    dims = {"obs": ["obs_id"] + [f"obs_dim_{i}" for i in range(post.data.y.dim() - 1)]}
    coords = {"obs_id": np.arange(n)}
    if "data" in inspect.signature(az.from_dict).parameters:  # ArviZ >= 1.0
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)
