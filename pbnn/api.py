"""``pbnn.fit``: the one entry point. A hand-written Pyro model follows :class:`pbnn.BNN`'s
convention: ``model(x, y=None, subsample=None)``, observations at ``"obs"`` inside
``pyro.plate("data", len(x), subsample=subsample)``; other sample sites are latent,
``pyro.param`` sites point estimates.

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

import contextlib

from pbnn.core.data import Data, LoaderData, validate
from pbnn.core.potential import Potential
from pbnn.engine.distributed import check_timeout, data_parallel
from pbnn.infer.base import Backend, make_backend
from pbnn.posterior.posterior import Posterior

__all__ = ["fit"]


def fit(
    model,
    x,
    y=None,
    method: str | Backend = "svi",
    *,
    distributed: bool = False,
    timeout: float | None = None,
    **options,
) -> Posterior:
    """Fit ``model`` to ``(x, y)``, or to the batches of a loader, with an inference backend and
    return its Posterior.

    Args:
        model: a :class:`pbnn.BNN` or a hand-written Pyro model ``model(x, y=None)``.
        x: inputs ``[N, ...]`` (tensor or array); or, with ``y`` left out, the data as a whole:
            a ``torch.utils.data.DataLoader`` or any re-iterable of ``(x, y)`` batches (read
            as it is: its batch size, sampler, workers; see docs/model.md, Data), or a
            map-style ``Dataset`` of ``(x_i, y_i)`` items (stacked into tensors).
        y: targets ``[N]`` / ``[N, D]`` (regression) or class labels ``[N]`` (classification).
        method: a method name (see ``pbnn.infer.BACKENDS``) or a backend object such as
            ``pbnn.infer.SVI(guide="full_rank")``.
        distributed: use the ranks of a ``torchrun`` job (see :mod:`pbnn.distributed`):
            data-parallel gradients (SVI, MAP, one SG-MCMC chain) or chains / members
            spread over the ranks (NUTS, HMC, MH, ensemble, MultiSWAG, several SG-MCMC
            chains); every rank must call ``fit`` with the same arguments and returns the
            same Posterior.
        timeout: with ``distributed=True``, the most seconds a rank waits for the others in
            one collective (None: ``pbnn.distributed.DEFAULT_TIMEOUT``, 300 s); a rank that
            stopped or is stuck then ends the job with ``pbnn.distributed.DistributedTimeoutError``
            instead of a hang. Also the ``init_process_group`` timeout when pbnn creates the
            group; for a group you create, pass ``init_process_group(timeout=...)`` yourself
            (``docs/distributed.md``).
        **options: the backend's constructor arguments, when ``method`` is a name.

    Raises:
        ValueError: for bad data (NaN/inf, mismatched lengths, bad labels, empty data; in a
            loader's batch: named by its position), an unknown method or an unknown option,
            ``batch_size=`` with a loader (the loader sets it), or a ``timeout`` that is not a
            positive number or comes without ``distributed=True``.
        TypeError: for a generator or other one-shot iterator as data (it cannot be re-read).

    Example:
        >>> import torch, pbnn
        >>> x = torch.randn(50, 1); y = torch.sin(x[:, 0])
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="map", num_steps=200, progress=False)
        >>> post.method
        'map'

        The same data from a DataLoader (batches of 10, each step takes the next one):

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
        >>> post = pbnn.fit(pbnn.BNN(net), loader, method="map", num_steps=200, progress=False)
        >>> len(post.data)
        50
    """
    if timeout is not None and not distributed:
        raise ValueError("timeout= applies to distributed fits only: pass distributed=True as well, or drop timeout")
    check_timeout(timeout)
    backend = make_backend(method, **options)
    data = validate(model, x, y)
    if isinstance(data, LoaderData):
        if getattr(backend, "batch_size", None) is not None:
            raise ValueError(
                f"batch_size={backend.batch_size} is set on the method, but the data come from a loader, "
                "whose own batch size pbnn uses: drop batch_size= (or build the loader with that batch size)"
            )
        if backend.full_batch:  # all the data in memory, or an error naming the minibatch methods
            data = Data(*data.tensors())
    potential = Potential(model, data)  # the one model interface of this fit
    with data_parallel(timeout=timeout) if distributed else contextlib.nullcontext():
        return backend.fit(potential)
