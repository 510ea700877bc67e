"""The functional potential of a :class:`pbnn.BNN`: its log joint as a pure torch function
of one flat unconstrained vector, without tracing Pyro.

Backends that evaluate the log joint thousands of times (SVI's fast path, NUTS/HMC,
SG-MCMC) use this instead of ``poutine.trace``. It packs the latent sites in a fixed
order, maps each to its support with ``torch.distributions.biject_to`` (adding the log
Jacobian), and evaluates prior plus likelihood with the minibatch scaled by ``N / B``,
exactly as the Pyro model's ``"data"`` plate does. ``torch.func.vmap`` over
:meth:`Potential.log_joint` batches particles or chains.

Example:
    >>> import torch, pbnn
    >>> model = pbnn.BNN(torch.nn.Linear(2, 1))
    >>> data = pbnn.data.validate(model, torch.randn(10, 2), torch.randn(10))
    >>> pot = pbnn.potential.Potential(model, data)
    >>> pot.names, pot.dim
    (['weight', 'bias', 'sigma'], 4)
    >>> pot.log_joint(torch.zeros(4)).shape
    torch.Size([])
"""

from __future__ import annotations

import math

import torch
from torch.distributions import ComposeTransform, Transform, biject_to

from pbnn.data import Data
from pbnn.model import BNN

__all__ = ["Potential"]


class Potential:
    """``z -> log p(theta(z), y | x) + log |d theta / d z|`` for a BNN and its data.

    Args:
        model: the BNN.
        data: validated training data.
        order: optional site order (e.g. an autoguide's); default: weights, prior
            hyper-parameters, likelihood noise sites.
    """

    def __init__(self, model: BNN, data: Data, order: list[str] | None = None) -> None:
        self.model = model
        self.data = data
        self.out_dim = model.output_dim(data.x)
        params = dict(model.net.named_parameters())
        specs: dict[str, tuple[torch.Size, Transform]] = {}
        for n in model.bayesian_names:
            specs[n] = (params[n].shape, biject_to(torch.distributions.constraints.real))
        if model.hyper_names:
            hyper_d = model.prior.hyper_distribution()
            for h in model.hyper_names:
                specs[h] = (hyper_d.event_shape, biject_to(hyper_d.support))
        for n, d in model.noise_sites(self.out_dim).items():
            specs[n] = (d.event_shape, biject_to(d.support))
        names = order if order is not None else list(specs)
        if sorted(names) != sorted(specs):
            raise ValueError(f"site order {names} does not match the model's latent sites {list(specs)}")
        self.names = list(names)
        self.shapes = [specs[n][0] for n in self.names]
        self.transforms = [specs[n][1] for n in self.names]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.dim = sum(self.sizes)
        self._identity = [_is_identity(t) for t in self.transforms]
        self._noise_priors = model.noise_sites(self.out_dim)  # built once, not per gradient
        self._flat_prior = self._fixed_normal_prior(params)

    def _fixed_normal_prior(self, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(loc [D], precision [D], constant)`` of the weights' prior when every weight has a
        fixed iid Normal prior (precision 0 on the other coordinates), so the weights' log
        prior is one fused expression instead of one distribution per tensor."""
        if self.model.hyper_names:
            return None
        loc, prec, const = [], [], 0.0
        for name, size in zip(self.names, self.sizes):
            spec = self.model.prior.fixed_normal(name, params[name]) if name in params else (0.0, math.inf)
            if spec is None:
                return None
            m, s = spec
            loc.append(torch.full((size,), m))
            prec.append(torch.full((size,), 0.0 if math.isinf(s) else s**-2))
            const -= 0.0 if math.isinf(s) else size * (math.log(s) + 0.5 * math.log(2 * math.pi))
        return torch.cat(loc), torch.cat(prec), torch.tensor(const)

    # ------------------------------------------------------------------ packing
    def unpack(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Constrained site values from ``z`` ``[..., D]`` and the log Jacobian ``[...]``."""
        batch = z.shape[:-1]
        out, log_det = {}, torch.zeros(batch, dtype=z.dtype, device=z.device)
        # One split (not one slice per site): its backward is a single concatenation.
        parts = z.split(self.sizes, -1)
        for name, shape, t, ident, u in zip(self.names, self.shapes, self.transforms, self._identity, parts):
            u = u.reshape(batch + shape)
            if ident:
                out[name] = u
                continue
            v = t(u)
            out[name] = v
            log_det = log_det + t.log_abs_det_jacobian(u, v).reshape(batch + (-1,)).sum(-1)
        return out, log_det

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unpack`: constrained values -> flat unconstrained ``z``."""
        parts = []
        for name, shape, t in zip(self.names, self.shapes, self.transforms):
            v = values[name]
            batch = v.shape[: v.dim() - len(shape)]
            parts.append(t.inv(v).reshape(batch + (-1,)))
        return torch.cat(parts, -1)

    def initial_z(self) -> torch.Tensor:
        """The network's own initialisation for the weights, prior medians elsewhere."""
        values = self.model.init_values()
        for n in self.names:
            if n not in values:
                if n in self.model.hyper_names:
                    d = self.model.prior.hyper_distribution()
                else:
                    d = self.model.noise_sites(self.out_dim)[n]
                values[n] = d.icdf(torch.tensor(0.5)).expand(d.event_shape) if hasattr(d, "icdf") else d.mean
        return self.pack(values)

    # ------------------------------------------------------------------ density
    def log_joint(
        self,
        z: torch.Tensor,
        idx: torch.Tensor | None = None,
        fixed: dict[str, torch.Tensor] | None = None,
        jacobian: bool = True,
    ) -> torch.Tensor:
        """Log joint density at one ``z`` ``[D]`` (vmap for batches).

        ``idx`` selects a minibatch; its log-likelihood is scaled by ``N / len(idx)``.
        ``fixed`` supplies values for the model's deterministic parameters.
        ``jacobian=False`` drops the log Jacobian: the density of the constrained values,
        whose maximiser is the MAP (as Pyro's ``AutoDelta`` computes it).
        """
        sample, log_det = self.unpack(z)
        x, y = self.data.x, self.data.y
        scale = 1.0
        if idx is not None:
            x, y, scale = x[idx], y[idx], len(self.data) / idx.shape[0]
        ll = self.model.log_likelihood(sample, x, y, fixed).sum()
        lp = self._log_prior(z, sample) + scale * ll
        return lp + log_det if jacobian else lp

    def _log_prior(self, z: torch.Tensor, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._flat_prior is None:
            return self.model.log_prior(sample, self.out_dim)
        loc, prec, const = (t.to(z) for t in self._flat_prior)
        u = z - loc
        lp = const - 0.5 * (prec * u * u).sum()
        for name, d in self._noise_priors.items():
            lp = lp + d.log_prob(sample[name])
        return lp

    def log_joint_batch(
        self, z: torch.Tensor, idx: torch.Tensor | None = None, fixed: dict | None = None
    ) -> torch.Tensor:
        """:meth:`log_joint` for ``z`` ``[P, D]``, vectorised with ``torch.func.vmap``."""
        if z.shape[0] == 1:  # skip vmap's overhead for the common single particle / chain
            return self.log_joint(z[0], idx, fixed)[None]
        return torch.func.vmap(lambda zz: self.log_joint(zz, idx, fixed), randomness="different")(z)


def _is_identity(t: Transform) -> bool:
    return isinstance(t, ComposeTransform) and not t.parts
