"""``pbnn.BNN``: a plain ``torch.nn.Module`` turned into a Pyro model with weight priors.

Sites (the convention of ``docs/model.md``): one sample site per Bayesian parameter, named like
the module parameter; likelihood latents and prior hyper-parameters are sample sites too;
observations are ``"obs"`` inside ``pyro.plate("data", N, subsample=...)``; deterministic
parameters are ``pyro.param`` sites. The network runs through ``torch.func.functional_call``,
so the same object is a Pyro model and a pure function of the weights.

Example:
    >>> import torch, pbnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0),
    ...                  likelihood=pbnn.likelihoods.Gaussian(scale="learned"))
    >>> model.bayesian_names
    ['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.func import functional_call

from pbnn.core import likelihoods as _lik
from pbnn.core import priors as _priors

__all__ = ["BNN", "eval_mode"]


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside the block, and every submodule's own mode restored after.

    (``net.train(was_training)`` would put all submodules in one mode, switching e.g. a frozen
    backbone's BatchNorm, which the user put in eval mode, back to train mode.)

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net[0].training
        False
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


def _fan_ins(net: nn.Module) -> dict[str, int]:
    """Fan-in of every parameter's layer: the weight's trailing dims, shared with its bias."""
    out: dict[str, int] = {}
    for mod_name, mod in net.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            # nn.Linear / ConvNd store [out, in, *kernel]; fan_in = in * prod(kernel).
            fan_in = int(math.prod(w.shape[1:]))
            prefix = f"{mod_name}." if mod_name else ""
            for pname, _ in mod.named_parameters(recurse=False):
                out[prefix + pname] = fan_in
    return out


class BNN(nn.Module):
    """A Bayesian neural network: ``net`` with a prior over its weights and a likelihood.

    Calling it, ``model(x, y=None, subsample=None)``, runs the Pyro model. It is a plain
    ``nn.Module`` (not a ``PyroModule``) on purpose: the weights are explicit
    ``pyro.sample`` sites and the net is evaluated functionally, so no parameter of the
    wrapped module ever lands in Pyro's param store by accident.

    Args:
        net: any ``torch.nn.Module`` with parameters. It is deep-copied; the caller's
            module is never modified.
        prior: a :class:`pbnn.priors.Prior` (default ``Normal(0, 1)``).
        likelihood: a :class:`pbnn.likelihoods.Likelihood` (default
            ``Gaussian(scale="learned")``).
        bayesian: optional predicate on parameter names; parameters for which it returns
            False stay deterministic (point estimates).
        last_layer: shortcut for "only the last module with trainable parameters is Bayesian".

    Parameters with ``requires_grad=False`` in ``net`` (a frozen pretrained backbone) are
    ``frozen_names``: neither Bayesian nor deterministic, every backend leaves them exactly as
    they are (``bayesian=`` cannot select them). ``docs/model.md`` says how BatchNorm
    statistics are treated.

    Example:
        >>> import torch, pbnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
        >>> m = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical(), last_layer=True)
        >>> m.bayesian_names, m.deterministic_names
        (['2.weight', '2.bias'], ['0.weight', '0.bias'])
        >>> net[0].requires_grad_(False)  # a frozen feature extractor
        Linear(in_features=2, out_features=4, bias=True)
        >>> pbnn.BNN(net).frozen_names, pbnn.BNN(net).bayesian_names
        (['0.weight', '0.bias'], ['2.weight', '2.bias'])
    """

    def __init__(
        self,
        net: nn.Module,
        prior: _priors.Prior | None = None,
        likelihood: _lik.Likelihood | None = None,
        *,
        bayesian: Callable[[str], bool] | None = None,
        last_layer: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not any(True for _ in net.parameters()):
            raise ValueError("net has no parameters; a BNN needs at least one weight to put a prior on")
        # Frozen (requires_grad=False) parameters are read from the net and never sampled or trained.
        self.frozen_names = [n for n, p in net.named_parameters() if not p.requires_grad]
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError(
                "every parameter of net has requires_grad=False (frozen), so none can be Bayesian; "
                "unfreeze the layers to infer, e.g. net[-1].requires_grad_(True)"
            )
        if bayesian is not None and last_layer:
            raise ValueError("pass either bayesian= or last_layer=True, not both")
        # The copy's own tensors are only shapes and initial values (and the frozen weights):
        # every other value used in the model comes from a sample or param site. It keeps the
        # caller's requires_grad flags, so pbnn.BNN(model.net) finds the same frozen parameters.
        self.net = copy.deepcopy(net)
        self.prior = copy.deepcopy(prior) if prior is not None else _priors.Normal(0.0, 1.0)
        # a copy: it records this network's output shape
        self.likelihood = copy.deepcopy(likelihood) if likelihood is not None else _lik.Gaussian(scale="learned")
        if not isinstance(self.prior, _priors.Prior):
            raise TypeError("prior must be a pbnn.priors.Prior, e.g. pbnn.priors.Normal(0.0, 1.0)")
        if not isinstance(self.likelihood, _lik.Likelihood):
            raise TypeError("likelihood must be a pbnn.likelihoods.Likelihood, e.g. pbnn.likelihoods.Gaussian()")
        self.prior.set_fan_ins(_fan_ins(self.net))
        # The constants of prior and likelihood follow the network (net.double(), net.cuda()).
        p0 = next(self.net.parameters())
        self.prior.to(device=p0.device, dtype=p0.dtype)
        if any(
            b.dtype != p0.dtype or b.device != p0.device for b in self.likelihood.buffers() if b.is_floating_point()
        ):
            self.likelihood = copy.deepcopy(self.likelihood).to(device=p0.device, dtype=p0.dtype)

        if last_layer:
            train_ids = {id(p) for n, p in self.net.named_parameters() if n in names}
            trainable = [m for m in self.net.modules() if any(id(p) in train_ids for p in m.parameters(recurse=False))]
            last_ids = {id(p) for p in trainable[-1].parameters(recurse=False)}
            is_bayes = {n: id(p) in last_ids for n, p in self.net.named_parameters() if id(p) in train_ids}
        else:
            is_bayes = {n: (bayesian(n) if bayesian is not None else True) for n in names}
        self.bayesian_names = [n for n in names if is_bayes[n]]
        self.deterministic_names = [n for n in names if not is_bayes[n]]
        if not self.bayesian_names:
            raise ValueError("no parameter is Bayesian: bayesian= returned False for every parameter name")
        self.hyper_names = self.prior.hyper_names(self.bayesian_names) if hasattr(self.prior, "hyper_names") else []
        self._out_dim: int | None = None

    # ------------------------------------------------------------------ functional API
    def output_dim(self, x: torch.Tensor) -> int:
        """Number of network outputs (evaluated once on one input row and cached)."""
        if self._out_dim is None:
            # Eval mode: BatchNorm cannot take a one-row batch in train mode (and must not
            # update its running statistics here).
            with eval_mode(self.net), torch.no_grad():
                f = self.net(x[:1])
            self.likelihood.set_output_shape(tuple(f.shape[1:]))
            self._out_dim = int(f.reshape(1, -1).shape[-1])
        return self._out_dim

    def noise_sites(self, out_dim: int) -> dict[str, dist.Distribution]:
        return self.likelihood.noise_sites(out_dim)

    def parameter_values(self) -> dict[str, torch.Tensor]:
        """Current values of all network parameters (detached copies)."""
        return {n: p.detach().clone() for n, p in self.net.named_parameters()}

    def output(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Network output ``[N, out_dim]`` with the given parameter values (others as in ``net``).

        An output with extra dimensions (``[N, C, H, W]``) is flattened here, so curvature and
        predictive code see one layout; the likelihood views it in its shape again
        (:attr:`pbnn.likelihoods.Likelihood.output_shape`, recorded on the first call).
        """
        f = functional_call(self.net, params, (x,))
        if f.dim() > 2 and self.likelihood.output_shape != tuple(f.shape[1:]):
            self.likelihood.set_output_shape(tuple(f.shape[1:]))
        return f.reshape(f.shape[0], -1)

    def prior_distributions(self, sample: dict[str, torch.Tensor]) -> dict[str, dist.Distribution]:
        """Prior of every Bayesian weight tensor given the hyper-parameters in ``sample``."""
        hyper = {h: sample[h] for h in self.hyper_names}
        params = dict(self.net.named_parameters())
        return {n: self.prior.distribution(n, params[n], hyper) for n in self.bayesian_names}

    def log_prior(self, sample: dict[str, torch.Tensor], out_dim: int) -> torch.Tensor:
        """Log prior density of all latent sites in ``sample`` (weights, hyper, noise)."""
        hyper = {h: sample[h] for h in self.hyper_names}
        lp = self.prior.hyper_log_prob(hyper)
        for n in self.bayesian_names:
            lp = lp + self.prior.log_prob(n, sample[n], hyper)
        for n, d in self.noise_sites(out_dim).items():
            lp = lp + d.log_prob(sample[n])
        return lp

    def log_likelihood(
        self, sample: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, fixed: dict | None = None
    ) -> torch.Tensor:
        """Pointwise ``log p(y_i | x_i, sample)``, shape ``[N]``."""
        f = self.output({**(fixed or {}), **{n: sample[n] for n in self.bayesian_names}}, x)
        return self.likelihood.log_prob(f, self._noise(sample, f.shape[-1]), y)

    def _noise(self, sample: dict[str, torch.Tensor], out_dim: int) -> dict[str, torch.Tensor]:
        return {n: sample[n] for n in self.noise_sites(out_dim)}

    def init_values(self) -> dict[str, torch.Tensor]:
        """Initial values for the Bayesian weights: the network's own initialisation.

        Starting inference from the module's (random, symmetry-breaking) init instead of
        the prior median (all zeros) keeps hidden units from collapsing onto each other.
        """
        vals = self.parameter_values()
        return {n: vals[n] for n in self.bayesian_names}

    # ------------------------------------------------------------------ Pyro model
    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, subsample: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The Pyro model: sample weights, evaluate the net, observe ``y`` at site ``"obs"``."""
        out_dim = self.output_dim(x)
        params = dict(self.net.named_parameters())
        sample = self.prior.sample_hyper(self.bayesian_names, params)
        for n, d in self.prior_distributions(sample).items():
            sample[n] = pyro.sample(n, d)
        for n, d in self.noise_sites(out_dim).items():
            sample[n] = pyro.sample(n, d)
        fixed = {n: pyro.param(n, lambda n=n: params[n].detach().clone()) for n in self.deterministic_names}
        weights = {**fixed, **{n: sample[n] for n in self.bayesian_names}}
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            xb = x if subsample is None else x[idx]
            f = self.output(weights, xb)
            yb = None if y is None else (y if subsample is None else y[idx])
            pyro.sample("obs", self.likelihood.conditional(f, self._noise(sample, out_dim)), obs=yb)
        return f
