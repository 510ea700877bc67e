"""The one model interface every backend works on: a model's log joint as a function of one flat
unconstrained vector ``z``, with the site layout (:class:`SiteLayout`, the one pack / unpack),
minibatch scaling and the fixed point-estimate parameters. :class:`BNNPotential` (a pure torch
function of a :class:`pbnn.BNN`'s weights) and :class:`PyroPotential` (a hand-written Pyro
model, traced) implement it; :meth:`Potential.require` names the way out when a backend
cannot serve a model.

Example:
    >>> import torch, pbnn
    >>> model = pbnn.BNN(torch.nn.Linear(2, 1))
    >>> data = pbnn.data.validate(model, torch.randn(10, 2), torch.randn(10))
    >>> pot = pbnn.potential.Potential(model, data)
    >>> type(pot).__name__, pot.names, pot.dim
    ('BNNPotential', ['weight', 'bias', 'sigma'], 4)
    >>> pot.log_joint(torch.zeros(4)).shape
    torch.Size([])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import ComposeTransform, Transform, biject_to, constraints

from pbnn.core.data import Batch, Data, LoaderData
from pbnn.core.model import BNN

__all__ = ["SiteLayout", "Potential", "BNNPotential", "PyroPotential", "accepts_subsample"]


def accepts_subsample(model) -> bool:
    """Whether a Pyro model takes the ``subsample=`` keyword pbnn uses for minibatches."""
    try:
        return "subsample" in inspect.signature(model).parameters
    except (TypeError, ValueError):
        return False


class SiteLayout:
    """Named sites <-> one flat unconstrained vector: the only pack / unpack in pbnn.

    Args:
        sites: ``(name, shape, transform)`` per site, in packing order; ``transform`` maps
            the unconstrained value to the site's support (``biject_to(support)``).

    Example:
        >>> import torch
        >>> from torch.distributions import transforms
        >>> lay = SiteLayout([("w", torch.Size([2]), transforms.identity_transform),
        ...                   ("s", torch.Size([]), transforms.ExpTransform())])
        >>> values, log_det = lay.unpack(torch.zeros(3))
        >>> values["s"].item(), lay.pack(values).tolist()
        (1.0, [0.0, 0.0, 0.0])
    """

    def __init__(self, sites: list[tuple[str, torch.Size, Transform]]) -> None:
        self.names = [n for n, _, _ in sites]
        self.shapes = [torch.Size(s) for _, s, _ in sites]
        self.transforms = [t for _, _, t in sites]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.dim = sum(self.sizes)
        self._identity = [_is_identity(t) for t in self.transforms]

    @property
    def sites(self) -> list[tuple[str, torch.Size, Transform]]:
        return list(zip(self.names, self.shapes, self.transforms))

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained site values ``{name: [..., *shape]}`` from ``z`` ``[..., D]``."""
        batch = z.shape[:-1]
        # One split (not one slice per site): its backward is a single concatenation.
        return {n: u.reshape(batch + s) for n, s, u in zip(self.names, self.shapes, z.split(self.sizes, -1))}

    def join(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        out = []
        for n, s in zip(self.names, self.shapes):
            v = parts[n]
            out.append(v.reshape(v.shape[: v.dim() - len(s)] + (-1,)))
        return torch.cat(out, -1) if out else torch.zeros(0)  # a model without latent sites

    def unpack(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Constrained site values from ``z`` ``[..., D]`` and the log Jacobian ``[...]``."""
        batch = z.shape[:-1]
        out, log_det = {}, torch.zeros(batch, dtype=z.dtype, device=z.device)
        for (name, u), t, ident in zip(self.split(z).items(), self.transforms, self._identity):
            if ident:
                out[name] = u
                continue
            v = t(u)
            out[name] = v
            log_det = log_det + t.log_abs_det_jacobian(u, v).reshape(batch + (-1,)).sum(-1)
        return out, log_det

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`unpack` without the Jacobian."""
        return self.unpack(z)[0]

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unpack`: constrained values -> flat unconstrained ``z``."""
        return self.join({n: t.inv(values[n]) for n, t in zip(self.names, self.transforms)})


class Potential:
    """``z -> log p(theta(z), y | x) + log |d theta / d z|`` for a model and its data.

    ``Potential(model, data)`` returns a :class:`BNNPotential` for a :class:`pbnn.BNN` and a
    :class:`PyroPotential` for a hand-written Pyro model.

    Attributes:
        model, data: what it was built from; ``kind`` is ``"bnn"`` or ``"pyro"``.
        layout: the :class:`SiteLayout` of ``z`` (``names``, ``shapes``, ``sizes``,
            ``transforms``, ``dim`` are its fields).
        fixed: point-estimate parameters the model holds (a BNN's non-Bayesian weights,
            a Pyro model's ``pyro.param`` sites) at their initial values.
    """

    kind = ""

    def __new__(cls, model=None, data=None, *args, **kwargs):
        if cls is Potential:
            cls = BNNPotential if isinstance(model, BNN) else PyroPotential
        return super().__new__(cls)

    layout: SiteLayout
    model: Callable
    data: Data | LoaderData
    fixed: dict[str, torch.Tensor]

    # ------------------------------------------------------------------ layout
    names = property(lambda self: self.layout.names)
    shapes = property(lambda self: self.layout.shapes)
    sizes = property(lambda self: self.layout.sizes)
    transforms = property(lambda self: self.layout.transforms)
    dim = property(lambda self: self.layout.dim)

    def unpack(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.layout.unpack(z)

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.pack(values)

    def __len__(self) -> int:
        return len(self.data)

    # ------------------------------------------------------------------ capabilities
    def require(self, method: str, kinds: tuple[str, ...] = ("bnn", "pyro"), *, minibatch: bool = False) -> None:
        """Raise a clear error when ``method`` cannot serve this model (kind or minibatches)."""
        if self.kind not in kinds:
            raise ValueError(
                f"method {method!r} trains network weights and needs a pbnn.BNN; for a hand-written Pyro "
                "model use a method that works on any log joint, e.g. method='svi', 'map', 'nuts' or 'sgld'"
            )
        if minibatch and not self.supports_minibatch:
            raise ValueError(
                f"minibatch {method} needs the Pyro model to accept subsample= and pass it to "
                "pyro.plate('data', N, subsample=subsample) (see pbnn.api); or pass batch_size >= len(x) "
                "for full-batch training"
            )

    supports_minibatch = True

    def network(self, method: str) -> BNN:
        """The :class:`pbnn.BNN`, for backends that need the network (raises for a Pyro model)."""
        self.require(method, ("bnn",))
        return self.model

    # ------------------------------------------------------------------ density
    def initial_z(self) -> torch.Tensor:
        raise NotImplementedError

    def log_joint(
        self,
        z: torch.Tensor,
        idx: torch.Tensor | Batch | None = None,
        fixed: dict[str, torch.Tensor] | None = None,
        jacobian: bool = True,
    ) -> torch.Tensor:
        """Log joint density at one ``z`` ``[D]``.

        ``idx`` selects a minibatch: row indices, or a :class:`pbnn.data.Batch` read from a
        loader (the log joint on that batch); its log-likelihood is scaled by ``N / len(idx)``.
        ``fixed`` supplies values for the model's point-estimate parameters (default
        :attr:`fixed`). ``jacobian=False`` drops the log Jacobian: the density of the
        constrained values, whose maximiser is the MAP (as Pyro's ``AutoDelta`` computes it).
        """
        raise NotImplementedError

    def log_joint_batch(
        self, z: torch.Tensor, idx: torch.Tensor | Batch | None = None, fixed: dict | None = None
    ) -> torch.Tensor:
        """:meth:`log_joint` for ``z`` ``[P, D]``."""
        return torch.stack([self.log_joint(zz, idx, fixed) for zz in z])


class BNNPotential(Potential):
    """The functional potential of a :class:`pbnn.BNN` (see the module docstring).

    Args:
        model: the BNN.
        data: validated training data (tensors, or a loader's :class:`pbnn.data.LoaderData`).
        order: optional site order (e.g. an autoguide's); default: weights, prior
            hyper-parameters, likelihood noise sites.
    """

    kind = "bnn"

    def __init__(self, model: BNN, data: Data | LoaderData, order: list[str] | None = None) -> None:
        self.model = model
        self.data = data
        self.out_dim = model.output_dim(data.head()[0])
        params = dict(model.net.named_parameters())
        specs: dict[str, tuple[torch.Size, Transform]] = {}
        for n in model.bayesian_names:
            specs[n] = (params[n].shape, biject_to(constraints.real))
        if model.hyper_names:
            hyper_d = model.prior.hyper_distribution()
            for h in model.hyper_names:
                specs[h] = (hyper_d.event_shape, biject_to(hyper_d.support))
        for n, d in model.noise_sites(self.out_dim).items():
            specs[n] = (d.event_shape, biject_to(d.support))
        names = order if order is not None else list(specs)
        if sorted(names) != sorted(specs):
            raise ValueError(f"site order {names} does not match the model's latent sites {list(specs)}")
        self.layout = SiteLayout([(n, *specs[n]) for n in names])
        self.fixed = {n: params[n].detach().clone() for n in model.deterministic_names}
        self._noise_priors = model.noise_sites(self.out_dim)  # built once, not per gradient
        self._flat_prior = self._fixed_normal_prior(params)

    def with_order(self, order: list[str]) -> BNNPotential:
        """The same potential with ``z`` packed in another site order (e.g. an autoguide's)."""
        return self if order == self.names else BNNPotential(self.model, self.data, order)

    def _fixed_normal_prior(self, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(loc [D], precision [D], constant)`` of the weights' prior when every weight has a
        fixed iid Normal prior (precision 0 on the other coordinates), so the weights' log
        prior is one fused expression instead of one distribution per tensor."""
        if self.model.hyper_names:
            return None
        loc, prec, const = [], [], 0.0
        p0 = next(iter(params.values()))
        like = {"dtype": p0.dtype, "device": p0.device}  # the network's: no per-call cast or copy
        for name, size in zip(self.names, self.sizes):
            spec = self.model.prior.fixed_normal(name, params[name]) if name in params else (0.0, math.inf)
            if spec is None:
                return None
            m, s = spec
            loc.append(torch.full((size,), m, **like))
            prec.append(torch.full((size,), 0.0 if math.isinf(s) else s**-2, **like))
            const -= 0.0 if math.isinf(s) else size * (math.log(s) + 0.5 * math.log(2 * math.pi))
        return torch.cat(loc), torch.cat(prec), torch.tensor(const, **like)

    def initial_z(self) -> torch.Tensor:
        """The network's own initialisation for the weights, prior medians elsewhere."""
        values = self.model.init_values()
        half = values[self.model.bayesian_names[0]].new_tensor(0.5)  # the network's dtype and device
        for n in self.names:
            if n not in values:
                if n in self.model.hyper_names:
                    d = self.model.prior.hyper_distribution()
                else:
                    d = self.model.noise_sites(self.out_dim)[n]
                values[n] = d.icdf(half).expand(d.event_shape) if hasattr(d, "icdf") else d.mean
        return self.pack(values)

    def log_joint(self, z, idx=None, fixed=None, jacobian=True):
        sample, log_det = self.unpack(z)
        x, y, scale = self.data.rows(idx)
        ll = self.model.log_likelihood(sample, x, y, self.fixed if fixed is None else fixed).sum()
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

    def log_joint_batch(self, z, idx=None, fixed=None):
        """:meth:`log_joint` for ``z`` ``[P, D]``, vectorised with ``torch.func.vmap``."""
        if z.shape[0] == 1:  # skip vmap's overhead for the common single particle / chain
            return self.log_joint(z[0], idx, fixed)[None]
        return torch.func.vmap(lambda zz: self.log_joint(zz, idx, fixed), randomness="different")(z)


class PyroPotential(Potential):
    """The potential of a hand-written Pyro model ``model(x, y=None[, subsample=None])``.

    Latent sites are found by one trace at ``init_to_median`` (in the model's sampling
    order); ``pyro.param`` sites become :attr:`fixed`. Each evaluation conditions the model
    on the constrained values and sums the trace's log densities (the ``"data"`` plate
    scales a ``subsample=`` minibatch by ``N / B``), plus the log Jacobian.
    """

    kind = "pyro"

    def __init__(self, model: Callable, data: Data) -> None:
        if not callable(model):
            raise TypeError(f"model must be a pbnn.BNN or a Pyro model function, got {type(model).__name__}")
        self.model, self.data = model, data
        self.supports_minibatch = accepts_subsample(model)
        # Forked RNG with a fixed seed: finding the sites (init_to_median draws from the prior)
        # never moves the caller's random stream (nor the current CUDA device's, once CUDA is in
        # use), and the starting point is the same whatever that stream's state, so seed= alone
        # makes a fit reproducible.
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda), pyro.get_param_store().scope():
            torch.manual_seed(0)
            trace = poutine.trace(model).get_trace(data.x, data.y)
            sites, init = [], {}
            for name, site in trace.iter_stochastic_nodes():
                if site_is_subsample(site):  # a plate's subsample site is not a latent variable
                    continue
                t = biject_to(site["fn"].support)
                init[name] = pyro.infer.autoguide.initialization.init_to_median(site).detach()
                sites.append((name, t.inv(init[name]).shape, t))
        self.layout = SiteLayout(sites)
        self.fixed = {n: s["value"].detach().clone() for n, s in trace.nodes.items() if s["type"] == "param"}
        self._init = self.pack(init)

    def initial_z(self) -> torch.Tensor:
        return self._init.clone()

    def log_joint(self, z, idx=None, fixed=None, jacobian=True):
        values, log_det = self.unpack(z)
        kwargs = {} if idx is None else {"subsample": idx}
        fixed = self.fixed if fixed is None else fixed
        with pyro.get_param_store().scope():
            store = pyro.get_param_store()
            for name, value in fixed.items():
                store[name] = value
            tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(self.data.x, self.data.y, **kwargs)
        lp = tr.log_prob_sum()
        return lp + log_det if jacobian else lp


def _is_identity(t: Transform) -> bool:
    return isinstance(t, ComposeTransform) and not t.parts
