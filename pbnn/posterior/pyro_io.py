"""Pyro's own results as a :class:`pbnn.Posterior`: a finished ``pyro.infer.MCMC`` run or a fitted
autoguide, so pbnn's predictive, ArviZ export, calibration and persistence apply to them.

Example:
    >>> import torch, pyro, pyro.distributions as dist, pbnn
    >>> def model(x, y=None):
    ...     w = pyro.sample("w", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", x.shape[0]):
    ...         pyro.sample("obs", dist.Normal(w * x[:, 0], 0.1), obs=y)
    >>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
    >>> mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=50, warmup_steps=50, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> post = pbnn.Posterior.from_pyro(mcmc)
    >>> post.method, post.samples["w"].shape, round(float(post.predict(x[-1:]).mean), 1)
    ('pyro:NUTS', torch.Size([1, 50]), 2.0)
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, biject_to

from pbnn.core.data import validate
from pbnn.core.model import BNN
from pbnn.posterior.approx import FlatApproximation
from pbnn.posterior.posterior import Posterior

__all__ = ["from_pyro"]


def from_pyro(source, model=None, x=None, y=None, *, num_samples: int = 1000, seed: int | None = 0) -> Posterior:
    """A :class:`pbnn.Posterior` of a finished ``pyro.infer.MCMC`` run or a fitted autoguide.

    Args:
        source: a ``pyro.infer.MCMC`` after ``run`` (its kernel's model and the ``run(x, y)``
            arguments are the defaults of ``model``, ``x``, ``y``), or a fitted
            ``pyro.infer.autoguide`` guide (``model`` defaults to the guide's; pass ``x``, ``y``).
        model: the model, a hand-written Pyro model ``model(x, y=None, ...)`` with an ``"obs"``
            site, or a :class:`pbnn.BNN`.
        x, y: the training data (for ArviZ's observed data, LOO and calibration).
        num_samples: draws taken from a guide (an MCMC run keeps its own draws).
        seed: seeds the guide's draws (the caller's RNG is left as it was).

    The model's ``pyro.param`` values are read from the current parameter store into
    ``Posterior.fixed``. MCMC divergences become ``sample_stats["diverging"]``; an
    ``AutoContinuous`` guide (``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
    ``AutoLowRankMultivariateNormal``, ``AutoLaplaceApproximation``...) is kept as the
    Posterior's approximation, so more draws can be made; other guides (``AutoNormal``,
    ``AutoDelta``...) are sampled, one guide trace per draw.
    """
    if isinstance(source, pyro.infer.MCMC):
        return _from_mcmc(source, model, x, y)
    if isinstance(source, AutoGuide):
        return _from_guide(source, model, x, y, num_samples, seed)
    raise TypeError(
        f"from_pyro takes a pyro.infer.MCMC run or a fitted pyro.infer.autoguide guide, got {type(source).__name__}"
    )


def _data(model, x, y, args: tuple = ()):
    if x is None or y is None:
        if len(args) < 2:
            raise ValueError("pass the training data: from_pyro(source, x=x, y=y)")
        x, y = args[0], args[1]
    if model is None:
        raise ValueError("pass the model: from_pyro(source, model=model)")
    return validate(model, x, y)


def _fixed(model, data, skip: str | None = None) -> dict[str, torch.Tensor]:
    """The model's deterministic parameters: a BNN's non-Bayesian weights, or the current
    values of a Pyro model's ``pyro.param`` sites (those it creates, from one trace)."""
    if isinstance(model, BNN):
        params = dict(model.net.named_parameters())
        return {n: params[n].detach().clone() for n in model.deterministic_names}
    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        trace = poutine.trace(model).get_trace(data.x, data.y)
    names = [n for n, s in trace.nodes.items() if s["type"] == "param" and not (skip and n.startswith(skip + "."))]
    return {n: store[n].detach().clone() for n in names}


def _from_mcmc(mcmc, model, x, y) -> Posterior:
    kernel = mcmc.kernel
    model = model if model is not None else getattr(kernel, "model", None)
    data = _data(model, x, y, getattr(mcmc, "_args", ()))
    samples = {k: v.detach() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    if not samples:
        raise ValueError("the MCMC run holds no draws: call mcmc.run(...) first")
    chains, draws = next(iter(samples.values())).shape[:2]
    diverging = torch.zeros(chains, draws, dtype=torch.bool)
    divergences = mcmc.diagnostics().get("divergences", {})
    for c, chain in enumerate(sorted(divergences)):  # "chain 0", "chain 1", ...: as az.from_pyro reads them
        idx = divergences[chain]
        diverging[c, torch.as_tensor(list(idx), dtype=torch.long)] = True
    return Posterior(
        model,
        samples,
        data=data,
        method=f"pyro:{type(kernel).__name__}",
        sample_stats={"diverging": diverging},
        fixed=_fixed(model, data),
        info={"num_chains": chains, "source": "pyro.infer.MCMC"},
    )


def _detached(q):
    if isinstance(q, Independent):
        return Independent(Normal(q.base_dist.loc.detach(), q.base_dist.scale.detach()), 1)
    if isinstance(q, LowRankMultivariateNormal):
        return LowRankMultivariateNormal(q.loc.detach(), q.cov_factor.detach(), q.cov_diag.detach())
    return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach())


def _from_guide(guide, model, x, y, num_samples: int, seed: int | None) -> Posterior:
    model = model if model is not None else guide.model
    data = _data(model, x, y)
    approx = None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(guide, AutoContinuous):
            sites = [
                (name, guide._unconstrained_shapes[name], biject_to(site["fn"].support))
                for name, site in guide.prototype_trace.iter_stochastic_nodes()
            ]
            approx = FlatApproximation(_detached(guide.get_posterior()), sites)
            samples = approx.sample(num_samples)
        else:
            with torch.no_grad():  # one guide trace per draw: the sites keep their own shapes
                traces = [poutine.trace(guide).get_trace(data.x, data.y) for _ in range(num_samples)]
            latent = [n for n, s in traces[0].nodes.items() if s["type"] == "sample" and not s["is_observed"]]
            samples = {n: torch.stack([t.nodes[n]["value"] for t in traces]) for n in latent}
    samples = {k: v.detach().reshape((1, num_samples) + v.shape[1:]) for k, v in samples.items()}
    return Posterior(
        model,
        samples,
        data=data,
        method=f"pyro:{type(guide).__name__}",
        fixed=_fixed(model, data, skip=guide._pyro_name),
        approximation=approx,
        info={"source": "pyro.infer.autoguide"},
    )
