"""``pbnn.fit``: the one entry point.

Hand-written Pyro models (the Pyro-syntax path) follow the same convention as
:class:`pbnn.BNN`:

* signature ``model(x, y=None)``; to allow minibatch backends also accept
  ``subsample=None`` and pass it to the data plate;
* observations at the sample site ``"obs"`` inside ``pyro.plate("data", len(x), subsample=subsample)``;
* every other ``pyro.sample`` site is a latent variable of the posterior; ``pyro.param``
  sites are point estimates (fitted by SVI / MAP, stored in ``Posterior.fixed``).

Example:
    >>> import torch, pyro, pbnn
    >>> import pyro.distributions as dist
    >>> def model(x, y=None, subsample=None):
    ...     w = pyro.sample("w", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(x), subsample=subsample) as i:
    ...         pyro.sample("obs", dist.Normal(w * x[i, 0], 0.1), obs=None if y is None else y[i])
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0]
    >>> post = pbnn.fit(model, x, y, method="svi", num_steps=500, lr=0.05, progress=False, seed=0)
    >>> abs(float(post.samples["w"].mean()) - 2.0) < 0.05
    True
"""

from __future__ import annotations

from pbnn.core.data import validate
from pbnn.core.potential import Potential
from pbnn.engine.distributed import data_parallel
from pbnn.infer.base import Backend, make_backend
from pbnn.posterior.posterior import Posterior

__all__ = ["fit"]


def fit(model, x, y, method: str | Backend = "svi", *, distributed: bool = False, **options) -> Posterior:
    """Fit ``model`` to ``(x, y)`` with an inference backend and return its Posterior.

    Args:
        model: a :class:`pbnn.BNN` or a hand-written Pyro model ``model(x, y=None)``.
        x: inputs ``[N, ...]`` (tensor or array).
        y: targets ``[N]`` / ``[N, D]`` (regression) or class labels ``[N]`` (classification).
        method: a method name (see ``pbnn.infer.BACKENDS``) or a backend object such as
            ``pbnn.infer.SVI(guide="full_rank")``.
        distributed: use the ranks of a ``torchrun`` job (see :mod:`pbnn.distributed`):
            data-parallel gradients (SVI, MAP, one SG-MCMC chain) or chains / members
            spread over the ranks (NUTS, HMC, MH, ensemble, MultiSWAG, several SG-MCMC
            chains); every rank must call ``fit`` with the same arguments and returns the
            same Posterior.
        **options: the backend's constructor arguments, when ``method`` is a name.

    Raises:
        ValueError: for bad data (NaN/inf, mismatched lengths, bad labels, empty data),
            an unknown method or an unknown option.

    Example:
        >>> import torch, pbnn
        >>> x = torch.randn(50, 1); y = torch.sin(x[:, 0])
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="map", num_steps=200, progress=False)
        >>> post.method
        'map'
    """
    backend = make_backend(method, **options)
    data = validate(model, x, y)
    if not distributed:
        return _fit(backend, model, data)
    with data_parallel():
        return _fit(backend, model, data)


def _fit(backend: Backend, model, data) -> Posterior:
    if type(backend).run is Backend.run:  # a backend that still implements fit(model, data) itself
        return backend.fit(model, data)
    return backend.fit(Potential(model, data))  # the one potential of this fit
