"""The one place pbnn builds an ArviZ object (``az.from_dict``; ArviZ 0.x and 1.x both handled).

Groups of ``post.to_arviz(x_new=None, y_new=None)``:

- ``posterior``: every latent site, plus every learned point estimate that is not a network
  tensor (e.g. Laplace's ``sigma``), repeated over the draws, so ``az.summary`` lists it.
- ``sample_stats``: the sampler's statistics under ArviZ's names (when it records any).
- ``log_likelihood`` (``obs``): pointwise ``log p(y_i | theta)``, computed once per posterior
  and cached (:func:`training_log_likelihood`).
- ``posterior_predictive`` (``obs``): one draw of ``y`` at every training input per posterior
  draw (seeded); ``observed_data`` (``obs``); ``constant_data``: the training inputs ``x``
  and the network tensors that were fitted as point estimates (non-Bayesian layers).
- with ``x_new``: ``predictions`` (``obs``: one draw of ``y`` at ``x_new`` per posterior
  draw) and ``predictions_constant_data`` (``x``: ``x_new``; ``obs``: ``y_new`` if given).

Dimension names: a :class:`pbnn.BNN`'s ``Linear`` / ``Conv`` layer ``<layer>`` has its units
on ``<layer>.out`` and its inputs on ``<layer>.in`` (weight ``[out, in]``, bias ``[out]``;
convolution kernels add ``<layer>.kernel_0``, ...); every other site ``<site>`` has dims
``<site>_dim_0``, ... (hand-written Pyro models keep their site names). Data points are
``obs_id`` (training) and ``pred_id`` (``x_new``); extra target and input dims are
``obs_dim_i`` and ``x_dim_i``.

Chains: Markov chains with several chains and draws are exported as they are. A posterior of
one chain (independent draws: SVI, Laplace, SWAG, MC dropout; a single SG-MCMC chain) or of
one draw per chain (an ensemble's members) is exported as 2 to 4 consecutive blocks of at
least 4 draws, one per chain: ArviZ computes R-hat only from 2 or more chains of 4 or more
draws. For a Markov chain this is split-R-hat with more splits; for independent draws R-hat
is near 1 by construction (it cannot judge the approximation), and ESS and MCSE are right.
When the draws do not split evenly (e.g. 5 ensemble members) they stay one chain (R-hat NaN).

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="svi", num_steps=50, num_samples=40, progress=False)
    >>> idata = pbnn.arviz_io.to_inference_data(post, x_new=torch.zeros(5, 1))
    >>> idata.posterior["0.weight"].dims
    ('chain', 'draw', '0.out', '0.in')
    >>> idata.posterior_predictive["obs"].shape, idata.predictions["obs"].shape
    ((4, 10, 20), (4, 10, 5))
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch
from torch import nn

from pbnn.core.data import check_inputs
from pbnn.core.model import BNN

__all__ = [
    "to_inference_data",
    "training_log_likelihood",
    "site_dims",
    "export_layout",
]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def export_layout(num_chains: int, num_draws: int) -> tuple[int, int]:
    """``(chains, draws)`` of the ArviZ export of a posterior of ``[num_chains, num_draws]``.

    Several chains of several draws stay as they are; otherwise the draws (in order) are
    split into the most of 4, 3 or 2 equal blocks of at least 4 draws (see the module doc).

    Example:
        >>> export_layout(4, 100), export_layout(1, 1000), export_layout(8, 1), export_layout(1, 6)
        ((4, 100), (4, 250), (2, 4), (1, 6))
    """
    if num_chains > 1 and num_draws > 1:
        return num_chains, num_draws
    total = num_chains * num_draws
    for chains in (4, 3, 2):
        if total % chains == 0 and total // chains >= 4:
            return chains, total // chains
    return 1, total


def site_dims(model, name: str, ndim: int) -> list[str]:
    """ArviZ dimension names (without chain and draw) of a site or tensor of ``ndim`` dims.

    Example:
        >>> import torch, pbnn
        >>> model = pbnn.BNN(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)))
        >>> site_dims(model, "0.weight", 2), site_dims(model, "2.bias", 1), site_dims(model, "sigma", 1)
        (['0.out', '0.in'], ['2.out'], ['sigma_dim_0'])
    """
    fallback = [f"{name}_dim_{i}" for i in range(ndim)]
    if not isinstance(model, BNN):
        return fallback
    layer, _, kind = name.rpartition(".")
    module = dict(model.net.named_modules()).get(layer)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return fallback
    if kind == "bias" and ndim == 1:
        return [f"{layer}.out"]
    if kind == "weight" and ndim >= 2:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight [in, out / groups, *kernel]
            head = [f"{layer}.in", f"{layer}.out"]
        else:
            head = [f"{layer}.out", f"{layer}.in"]
        return head + [f"{layer}.kernel_{i}" for i in range(ndim - 2)]
    return fallback


def _is_network_tensor(model, name: str) -> bool:
    """Whether a point estimate in ``post.fixed`` is a network tensor (exported as constant data)."""
    if isinstance(model, BNN):
        return name in dict(model.net.named_parameters()) or name in dict(model.net.named_buffers())
    return "$$$" in name  # parameters that pyro.module registered for a torch module


def _draw_y(pred, seed: int, stream: int) -> torch.Tensor:
    """One draw of ``y`` per posterior draw of ``pred``, from ``seed`` (``stream`` 0: at the
    training inputs, 1: at ``x_new``), leaving torch's global random state as it was."""
    device = pred.samples.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))
        return pred.conditional.sample()


def _training(post, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_likelihood [chain, draw, N], y draws [chain * draw, N, ...])`` at the training inputs.

    Computed from one pass of the predictive and cached on ``post`` (a posterior does not
    change after its fit): the log-likelihood once, the draws of ``y`` for the last ``seed``.
    Keyed by the predictor's ``predictive`` setting (Laplace's can be switched after
    fitting). Only these two ``[S, N]`` tables are kept, not the predictive itself; the cache
    is never saved.
    """
    key = getattr(post.predictor, "predictive", None)
    cache = post.__dict__.get("_training_cache")
    if cache is None or cache["predictive"] != key or cache["seed"] != seed:
        pred = post.predict(post.data.x)
        if cache is None or cache["predictive"] != key:
            lp = pred.pointwise_log_likelihood(post.data.y).reshape(post.num_chains, post.num_draws, -1)
            cache = {"predictive": key, "log_likelihood": lp}
        cache.update(seed=seed, replicates=_draw_y(pred, seed, 0))
        post.__dict__["_training_cache"] = cache
    return cache["log_likelihood"], cache["replicates"]


def training_log_likelihood(post) -> torch.Tensor:
    """Pointwise ``log p(y_i | x_i, theta)`` of the training data, ``[chain, draw, N]`` (computed
    once per posterior, then cached)."""
    return _training(post)[0]


def to_inference_data(post, x_new=None, y_new=None, *, seed: int = 0):
    """Convert a :class:`pbnn.Posterior` to ArviZ (``InferenceData``; a ``DataTree`` on ArviZ 1.x).

    Args:
        post: the posterior.
        x_new: optional test inputs: adds ``predictions`` (one draw of ``y`` per posterior
            draw) and ``predictions_constant_data`` (``x``).
        y_new: optional test targets for ``x_new``, stored as ``predictions_constant_data["obs"]``.
        seed: seed of the ``posterior_predictive`` and ``predictions`` draws.

    The groups, dimension names and chain layout are described in the module doc.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    if y_new is not None and x_new is None:
        raise ValueError("y_new needs x_new (the inputs of the test targets); pass both")
    model = post.model
    chains, draws = export_layout(post.num_chains, post.num_draws)

    def lay(t: torch.Tensor, lead: int = 2) -> np.ndarray:  # [C, S, ...] or [C * S, ...] -> export layout
        return _np(t).reshape((chains, draws) + tuple(t.shape[lead:]))

    posterior = {k: lay(v) for k, v in post.samples.items()}
    constant = {}
    for k, v in post.fixed.items():
        if _is_network_tensor(model, k):
            constant[k] = _np(v)
        elif k not in posterior:  # a learned point estimate: a point mass, repeated over draws
            posterior[k] = np.broadcast_to(_np(v), (chains, draws) + tuple(v.shape))
    dims = {k: site_dims(model, k, v.ndim - 2) for k, v in posterior.items()}
    dims.update({k: site_dims(model, k, v.ndim) for k, v in constant.items()})

    log_lik, replicates = _training(post, seed)
    y = post.data.y
    obs_dims = [f"obs_dim_{i}" for i in range(y.dim() - 1)]
    groups = {
        "posterior": posterior,
        "sample_stats": {k: lay(v) for k, v in post.sample_stats.items()},
        "log_likelihood": {"obs": lay(log_lik)},
        "posterior_predictive": {"obs": lay(replicates, 1)},
        "observed_data": {"obs": _np(y)},
        "constant_data": constant,
    }
    dims["obs"] = ["obs_id"] + obs_dims
    x = post.data.x
    if isinstance(x, torch.Tensor):
        constant["x"] = _np(x)
        dims["x"] = ["obs_id"] + [f"x_dim_{i}" for i in range(x.dim() - 1)]
    pred_dims = {"obs": ["pred_id"] + obs_dims}
    if x_new is not None:
        x_new = check_inputs(x_new, x if isinstance(x, torch.Tensor) else None)
        new = post.predict(x_new)
        groups["predictions"] = {"obs": lay(_draw_y(new, seed, 1), 1)}
        groups["predictions_constant_data"] = {"x": _np(x_new)}
        pred_dims["x"] = ["pred_id"] + [f"x_dim_{i}" for i in range(x_new.dim() - 1)]
        if y_new is not None:
            groups["predictions_constant_data"]["obs"] = _np(new._check_targets(y_new))
    groups = {k: v for k, v in groups.items() if v}
    coords = {"obs_id": np.arange(y.shape[0])}
    pred_coords = {"pred_id": np.arange(x_new.shape[0])} if x_new is not None else {}
    kwargs = {"coords": coords, "dims": dims, "pred_dims": pred_dims, "pred_coords": pred_coords}
    if "data" in inspect.signature(az.from_dict).parameters:  # ArviZ >= 1.0
        return az.from_dict(groups, **kwargs)
    # ArviZ 0.x reads predictions_constant_data with `dims`, not `pred_dims`: add it as a Dataset.
    new_data = groups.pop("predictions_constant_data", None)
    idata = az.from_dict(**groups, **kwargs)
    if new_data is not None:
        import xarray as xr

        variables = {k: (pred_dims[k], v) for k, v in new_data.items()}
        idata.add_groups({"predictions_constant_data": xr.Dataset(variables, coords=pred_coords)})
    return idata
