"""Fitted Gaussian-like posteriors over the flat unconstrained vector ``z`` (:class:`Approximation`):
draws, log density, mean and ``J Sigma J^T``, packed by the model's
:class:`pbnn.potential.SiteLayout`. :class:`FlatApproximation` (any torch distribution: SVI
guides, dense / diagonal Laplace, SWAG), :class:`KroneckerApproximation` (KFAC Laplace),
:class:`SWAGNormal` (low-rank plus diagonal). Drawing needs no Pyro param store.

Example:
    >>> import torch, pbnn
    >>> from torch.distributions import MultivariateNormal, transforms
    >>> q = MultivariateNormal(torch.zeros(3), torch.eye(3))
    >>> a = pbnn.approx.FlatApproximation(q, [("w", torch.Size([2]), transforms.identity_transform),
    ...                                       ("sigma", torch.Size([]), transforms.ExpTransform())])
    >>> {k: tuple(v.shape) for k, v in a.sample(5, seed=0).items()}
    {'w': (5, 2), 'sigma': (5,)}
    >>> a.functional_covariance(torch.ones(4, 1, 3)).shape    # J Sigma J^T for J [M, C, D]
    torch.Size([4, 1, 1])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    Transform,
    constraints,
)
from torch.distributions.transforms import identity_transform

from pbnn.core.potential import SiteLayout
from pbnn.engine.distributed import rng_devices
from pbnn.posterior.serialization import decode_transform, encode_transform, register

__all__ = ["Approximation", "FlatApproximation", "KroneckerApproximation", "LazyDraws", "SWAGNormal", "SwagMoments"]


class Approximation:
    """A distribution over the flat unconstrained ``z`` of :attr:`layout`'s sites.

    Implement :meth:`sample_z`, :meth:`log_prob`, :attr:`loc` and :meth:`functional_covariance`;
    :meth:`sample` and :attr:`mean` (constrained site values) follow from the layout.
    """

    layout: SiteLayout

    def sample_z(self, num_samples: int) -> torch.Tensor:  # [num_samples, D], torch's global RNG
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:  # z [..., D] (unconstrained) -> [...]
        raise NotImplementedError

    @property
    def loc(self) -> torch.Tensor:  # the mean of z, [D]
        raise NotImplementedError

    def functional_covariance(self, jac: torch.Tensor) -> torch.Tensor:
        """``J Sigma J^T`` ``[M, C, C]`` (float64) for a Jacobian ``jac`` ``[M, C, D]`` in ``z``."""
        raise NotImplementedError

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` draws, each site ``[num_samples, *shape]``; reproducible with ``seed``
        (the caller's RNG state is restored either way)."""
        with torch.random.fork_rng(devices=rng_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            z = self.sample_z(num_samples)
        return self.layout.constrain(z)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """The site values at the mean of ``z`` (the mode for a Gaussian)."""
        return self.layout.constrain(self.loc)

    def chain(self, c: int, num_chains: int) -> Approximation:
        """The distribution chain ``c`` of ``num_chains`` draws from (all of them: this one;
        a multi-run SWAG draws chain ``c`` from run ``c``)."""
        return self


def _layout_state(layout: SiteLayout) -> list:
    return [[n, list(s), encode_transform(t)] for n, s, t in layout.sites]


def _layout_from_state(state: list) -> SiteLayout:
    return SiteLayout([(n, torch.Size(s), decode_transform(t)) for n, s, t in state])


@register("approximation", "flat")
class FlatApproximation(Approximation):
    """``q(z)``, a torch distribution over the flat unconstrained ``z``, and the ``sites`` it packs
    (a :class:`pbnn.potential.SiteLayout` or its ``(name, shape, transform)`` list)."""

    def __init__(self, q: Distribution, sites: SiteLayout | list[tuple[str, torch.Size, Transform]]) -> None:
        self.layout = sites if isinstance(sites, SiteLayout) else SiteLayout(list(sites))
        if q.event_shape != torch.Size([self.layout.dim]):
            raise ValueError(f"q has event shape {tuple(q.event_shape)}, but the sites pack {self.layout.dim} numbers")
        self.q = q

    def sample_z(self, num_samples: int) -> torch.Tensor:
        return self.q.sample((num_samples,))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.q.log_prob(z)

    @property
    def loc(self) -> torch.Tensor:
        return self.q.mean

    def chain(self, c: int, num_chains: int) -> Approximation:
        if isinstance(self.q, SWAGNormal) and num_chains == self.q.num_runs > 1:
            return FlatApproximation(self.q.run(c), self.layout)
        return self

    def functional_covariance(self, jac: torch.Tensor) -> torch.Tensor:
        J, q = jac.double(), self.q
        if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
            return torch.einsum("mcd,d,med->mce", J, q.base_dist.scale.double() ** 2, J)
        if isinstance(q, MultivariateNormal):
            LtJ = torch.einsum("de,mcd->mce", q.scale_tril.double(), J)  # Sigma = L L^T
            return torch.einsum("mce,mke->mck", LtJ, LtJ)
        return J @ q.covariance_matrix.double() @ J.mT

    def state(self) -> dict:
        """Tensors and plain data to store in a posterior file (:mod:`pbnn.posterior.serialization`);
        ``q`` must be a diagonal, full or low-rank normal, or a :class:`SWAGNormal`."""
        q = self.q
        if type(q) is Independent and type(q.base_dist) is Normal and q.reinterpreted_batch_ndims == 1:
            dist = {"type": "diag_normal", "loc": q.base_dist.loc, "scale": q.base_dist.scale}
        elif type(q) is MultivariateNormal:
            dist = {"type": "mvn", "loc": q.loc, "scale_tril": q.scale_tril}
        elif type(q) is LowRankMultivariateNormal:
            dist = {"type": "low_rank_mvn", "loc": q.loc, "cov_factor": q.cov_factor, "cov_diag": q.cov_diag}
        elif type(q) is SWAGNormal:
            dist = {"type": "swag", "mean": q.loc_runs, "diag": q.diag, "dev": q.dev, "scale": q.scale}
        else:
            raise ValueError(f"cannot store a FlatApproximation of {type(q).__name__} in a posterior file")
        return {"q": dist, "sites": _layout_state(self.layout)}

    @classmethod
    def from_state(cls, state: dict) -> FlatApproximation:
        d = state["q"]
        kind = d["type"]
        if kind == "diag_normal":
            q = Independent(Normal(d["loc"], d["scale"]), 1)
        elif kind == "mvn":
            q = MultivariateNormal(d["loc"], scale_tril=d["scale_tril"])
        elif kind == "low_rank_mvn":
            q = LowRankMultivariateNormal(d["loc"], d["cov_factor"], d["cov_diag"])
        elif kind == "swag":
            q = SWAGNormal(d["mean"], d["diag"], d["dev"], d["scale"])
        else:
            raise ValueError(f"unknown distribution {kind!r} in a posterior file")
        return cls(q, _layout_from_state(state["sites"]))


@register("approximation", "kronecker")
class KroneckerApproximation(Approximation):
    """Gaussian over the weights of Linear / Conv2d layers with precision ``G kron A + delta I`` per layer.

    Args:
        layers: ``(module prefix, weight site, bias site or None)`` per layer.
        mean: the mean ``{site: value}``, in flat (``z``) order; each layer's sites contiguous.
        factors: ``{prefix: (G [out, out], A [K+1, K+1])}`` (``K`` = the weight's columns, ``in * kh * kw``).
        prior_precision: ``{prefix: delta}``.

    Each layer's ``[W | b]`` (row-major) has precision ``(Q_G kron Q_A) (lam_G lam_A^T + delta)
    (Q_G kron Q_A)^T`` from the eigendecompositions of its factors, so draws, the log density,
    the log-determinant and ``J Sigma J^T`` cost only factor-sized work.

    Example:
        >>> import torch
        >>> q = KroneckerApproximation([("", "weight", "bias")], {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)},
        ...                            {"": (torch.eye(1), torch.eye(3))}, {"": 1.0})
        >>> {k: tuple(v.shape) for k, v in q.sample(4, seed=0).items()}
        {'weight': (4, 1, 2), 'bias': (4, 1)}
        >>> round(float(q.log_prob(torch.zeros(3))), 4)     # N(0, I / 2) in 3 dimensions at its mean
        -1.7171
    """

    def __init__(self, layers, mean: dict[str, torch.Tensor], factors: dict, prior_precision: dict) -> None:
        self.layers = list(layers)
        self.mean_values = {k: v.detach().clone() for k, v in mean.items()}
        self.layout = SiteLayout([(n, v.shape, identity_transform) for n, v in self.mean_values.items()])
        self.eig = {}
        dtype = next(iter(self.mean_values.values())).dtype
        for p, _, _ in self.layers:
            G, A = factors[p]
            lg, qg = torch.linalg.eigh(G.double())
            la, qa = torch.linalg.eigh(A.double())
            # Eigenvectors rounded to the weights' dtype (the file stores them so, at half the bytes of
            # float64), kept float64 for the arithmetic; PSD factors: clamp round-off negatives.
            qg, qa = qg.to(dtype).double(), qa.to(dtype).double()
            self.eig[p] = (lg.clamp_min(0), qg, la.clamp_min(0), qa)
        self.set_prior_precision(prior_precision)

    def state(self) -> dict:
        """Tensors and plain data to store in a posterior file (the eigendecompositions, eigenvectors in
        the weights' dtype they were rounded to: a loaded copy draws the same numbers)."""
        dtype = next(iter(self.mean_values.values())).dtype
        return {
            "layers": [list(layer) for layer in self.layers],
            "mean": self.mean_values,
            "eig": {p: [lg, qg.to(dtype), la, qa.to(dtype)] for p, (lg, qg, la, qa) in self.eig.items()},
            "prior_precision": self.prior_precision,
        }

    @classmethod
    def from_state(cls, state: dict) -> KroneckerApproximation:
        self = cls.__new__(cls)
        self.layers = [tuple(layer) for layer in state["layers"]]
        self.mean_values = dict(state["mean"])
        self.layout = SiteLayout([(n, v.shape, identity_transform) for n, v in self.mean_values.items()])
        self.eig = {p: tuple(e.double() for e in eig) for p, eig in state["eig"].items()}
        self.set_prior_precision(state["prior_precision"])
        return self

    def set_prior_precision(self, prior_precision: dict) -> None:
        device = next(iter(self.mean_values.values())).device
        self.prior_precision = {
            p: torch.as_tensor(prior_precision[p], dtype=torch.double, device=device) for p, _, _ in self.layers
        }

    def _matrix(self, values: dict, w: str, b: str | None) -> torch.Tensor:
        W = values[w]  # [..., out, in] (Linear) or [..., out, in, kh, kw] (Conv2d): flatten to [..., out, K]
        W = W.reshape(W.shape[: W.dim() - self.mean_values[w].dim() + 1] + (-1,))
        return W if b is None else torch.cat([W, values[b][..., None]], -1)

    def _eigenvalues(self, p: str, delta=None) -> torch.Tensor:
        lg, _, la, _ = self.eig[p]
        return lg[:, None] * la[None, :] + (self.prior_precision[p] if delta is None else delta)

    def logdet_precision(self, deltas: dict | None = None) -> torch.Tensor:
        """``log det`` of the posterior precision (differentiable in ``deltas``)."""
        return sum(self._eigenvalues(p, None if deltas is None else deltas[p]).log().sum() for p, _, _ in self.layers)

    def sample_z(self, num_samples: int) -> torch.Tensor:
        out = {}
        for p, w, b in self.layers:
            _, qg, _, qa = self.eig[p]
            lam = self._eigenvalues(p)
            eps = torch.randn((num_samples,) + tuple(lam.shape), dtype=torch.double, device=lam.device) / lam.sqrt()
            draw = self._matrix(self.mean_values, w, b) + (qg @ eps @ qa.T).to(self.mean_values[w].dtype)
            shape = self.mean_values[w].shape
            out[w] = draw[..., : shape[1:].numel()].reshape((num_samples,) + shape)
            if b is not None:
                out[b] = draw[..., -1]
        return self.layout.join(out)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        parts = self.layout.split(z.double() - self.loc.double())
        total = -0.5 * self.layout.dim * math.log(2 * math.pi) + 0.5 * self.logdet_precision()
        for p, w, b in self.layers:
            _, qg, _, qa = self.eig[p]
            T = qg.T @ self._matrix(parts, w, b) @ qa
            total = total - 0.5 * (self._eigenvalues(p) * T**2).sum((-2, -1))
        return total

    @property
    def loc(self) -> torch.Tensor:
        return self.layout.join(self.mean_values)

    def functional_covariance(self, jac: torch.Tensor) -> torch.Tensor:
        per_site = self.layout.split(jac.double())  # {site: [M, C, *shape]}
        total = 0.0
        for p, w, b in self.layers:
            _, qg, _, qa = self.eig[p]
            T = qg.T @ self._matrix(per_site, w, b) @ qa  # [M, C, out, in(+1)] in the eigenbasis
            total = total + torch.einsum("mcoi,mdoi,oi->mcd", T, T, 1.0 / self._eigenvalues(p))
        return total


# ----------------------------------------------------------------------------- SWAG
class SwagMoments:
    """Running SWAG statistics of ``M`` independent runs of vectors ``theta`` ``[M, D]``.

    Example:
        >>> import torch
        >>> mom = SwagMoments(dim=2, rank=2)
        >>> for t in ([1.0, 0.0], [3.0, 2.0], [2.0, 4.0]):
        ...     mom.update(torch.tensor([t]))
        >>> mom.mean, mom.diag, mom.deviations.shape
        (tensor([[2., 2.]]), tensor([[0.6667, 2.6667]]), torch.Size([1, 2, 2]))
    """

    def __init__(self, dim: int, rank: int = 20, num_runs: int = 1) -> None:
        self.rank = rank
        self.n = 0
        self.mean = torch.zeros(num_runs, dim)
        self.sq_mean = torch.zeros(num_runs, dim)
        self._devs: list[torch.Tensor] = []

    def update(self, theta: torch.Tensor) -> None:
        """Add one iterate ``theta`` ``[M, D]``."""
        self.n += 1
        self.mean, self.sq_mean = self.mean.to(theta), self.sq_mean.to(theta)  # the iterates' dtype and device
        self.mean = self.mean + (theta - self.mean) / self.n
        self.sq_mean = self.sq_mean + (theta * theta - self.sq_mean) / self.n
        if self.rank > 0:
            self._devs.append(theta - self.mean)  # with the mean already updated, as in the paper's code
            if len(self._devs) > self.rank:
                self._devs.pop(0)

    @property
    def diag(self) -> torch.Tensor:
        """``clamp(s - m^2, 1e-30)``, ``[M, D]``."""
        return (self.sq_mean - self.mean**2).clamp_min(1e-30)

    @property
    def deviations(self) -> torch.Tensor:
        """The last ``K`` deviation columns ``D``, ``[M, D, K]`` (``K = 0`` before any or with rank 0)."""
        if not self._devs:
            return self.mean.new_zeros(self.mean.shape + (0,))
        return torch.stack(self._devs, -1)

    def distribution(self, scale: float) -> SWAGNormal:
        return SWAGNormal(self.mean, self.diag, self.deviations, scale)


class SWAGNormal(Distribution):
    """The SWAG Gaussian of ``M`` runs as an equal mixture over runs, over one flat vector.

    Run ``m`` is ``N(mean_m, scale * (diag_m + D_m D_m^T / max(K - 1, 1)))``. ``sample((S,))``
    gives ``[S, D]``: draw ``i`` comes from run ``i mod M`` and is
    ``m + sqrt(scale) * (Sigma_diag^(1/2) z1 + D z2 / sqrt(max(K - 1, 1)))``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, mean: torch.Tensor, diag: torch.Tensor, deviations: torch.Tensor, scale: float) -> None:
        self.loc_runs, self.diag, self.dev, self.scale = mean, diag, deviations, float(scale)
        super().__init__(torch.Size(), mean.shape[-1:], validate_args=False)

    @property
    def num_runs(self) -> int:
        return self.loc_runs.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.loc_runs.mean(0)

    def run(self, m: int) -> SWAGNormal:
        """The Gaussian of run ``m`` alone."""
        return SWAGNormal(self.loc_runs[m : m + 1], self.diag[m : m + 1], self.dev[m : m + 1], self.scale)

    def _factor(self) -> torch.Tensor:
        """``sqrt(scale) * D / sqrt(max(K - 1, 1))``, ``[M, D, K]``: the low-rank factor of each run."""
        return math.sqrt(self.scale) * self.dev / math.sqrt(max(self.dev.shape[-1] - 1, 1))

    def covariance_matrix_of_run(self, m: int = 0) -> torch.Tensor:
        """``scale * (Sigma_diag + D D^T / (K - 1))`` of run ``m``, ``[D, D]``."""
        k = self.dev.shape[-1]
        d = self.dev[m]
        return self.scale * (torch.diag(self.diag[m]) + d @ d.T / max(k - 1, 1))

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Covariance of the mixture: the runs' mean covariance plus the covariance of their means."""
        centred = self.loc_runs - self.mean
        runs = [self.covariance_matrix_of_run(m) for m in range(self.num_runs)]
        return torch.stack(runs).mean(0) + centred.T @ centred / self.num_runs

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.dev.shape[-1] == 0:  # SWAG-diagonal
            runs = Independent(Normal(self.loc_runs, (self.scale * self.diag).sqrt()), 1)
        else:
            runs = LowRankMultivariateNormal(self.loc_runs, self._factor(), self.scale * self.diag)
        return torch.logsumexp(runs.log_prob(value[..., None, :]), -1) - math.log(self.num_runs)

    def sample_runs(self, num_per_run: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_per_run`` draws from every run: ``[M, S, D]``."""
        m, dim = self.loc_runs.shape
        k = self.dev.shape[-1]
        like = {"dtype": self.loc_runs.dtype, "device": self.loc_runs.device}
        z1 = torch.randn(m, num_per_run, dim, generator=generator, **like)
        out = self.loc_runs[:, None] + math.sqrt(self.scale) * self.diag.sqrt()[:, None] * z1
        if k > 0:
            z2 = torch.randn(m, num_per_run, k, generator=generator, **like)
            out = out + math.sqrt(self.scale) * torch.einsum("mdk,msk->msd", self.dev, z2) / math.sqrt(max(k - 1, 1))
        return out

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        num = int(math.prod(sample_shape))
        per_run = math.ceil(num / self.num_runs)
        draws = self.sample_runs(per_run).transpose(0, 1).reshape(-1, self.loc_runs.shape[-1])[:num]
        return draws.reshape(tuple(sample_shape) + (self.loc_runs.shape[-1],))


# ----------------------------------------------------------------------------- draws on demand
class LazyDraws:
    """``num_chains x num_draws`` draws of an :class:`Approximation`, made on demand, never stored.

    Draw ``i`` of chain ``c`` lies in block ``i // block``; a block is drawn with its own seed
    (``numpy.random.SeedSequence([seed, c, block index])``), so any range of draws is the same
    numbers whatever order or chunks it is asked for in, and a saved posterior (which stores
    ``seed`` and ``block``, not the draws) draws them again exactly. A block holds at most
    ``block`` draws (by default ``2**20 // D`` capped to [1, 100]: at most 4 MB of float32).

    Example:
        >>> import torch
        >>> from torch.distributions import Independent, Normal, transforms
        >>> q = FlatApproximation(Independent(Normal(torch.zeros(3), torch.ones(3)), 1),
        ...                       [("w", torch.Size([3]), transforms.identity_transform)])
        >>> lazy = LazyDraws(q, num_draws=250, seed=7)
        >>> lazy.block, lazy.get(0, 250)["w"].shape
        (100, torch.Size([250, 3]))
        >>> torch.equal(lazy.get(120, 130)["w"], lazy.get(0, 250)["w"][120:130])
        True
    """

    def __init__(
        self, approximation: Approximation, num_draws: int, seed: int, num_chains: int = 1, block: int | None = None
    ) -> None:
        if num_draws < 1 or num_chains < 1:
            raise ValueError(f"LazyDraws needs num_draws >= 1 and num_chains >= 1, got {num_draws}, {num_chains}")
        self.approximation = approximation
        self.num_chains, self.num_draws, self.seed = int(num_chains), int(num_draws), int(seed)
        self.block = int(block) if block is not None else max(1, min(100, 2**20 // max(1, approximation.layout.dim)))
        self._last = None  # the last block drawn, (key, draws)

    @classmethod
    def from_rng(cls, approximation: Approximation, num_draws: int, num_chains: int = 1) -> LazyDraws:
        """Draws whose seed comes from torch's global RNG (what a seeded fit makes reproducible)."""
        return cls(approximation, num_draws, int(torch.randint(2**62, ())), num_chains)

    def __len__(self) -> int:
        return self.num_chains * self.num_draws

    def _block(self, c: int, b: int) -> dict[str, torch.Tensor]:
        if self._last is not None and self._last[0] == (c, b):  # chunks smaller than a block: draw it once
            return self._last[1]
        n = min(self.block, self.num_draws - b * self.block)
        seed = int(np.random.SeedSequence([self.seed, c, b]).generate_state(1, dtype=np.uint64)[0] >> 1)
        draws = self.approximation.chain(c, self.num_chains).sample(n, seed=seed)
        self._last = ((c, b), draws)
        return draws

    def get(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Flat draws ``start:stop`` (chains concatenated, as :meth:`pbnn.Posterior.flat_samples`)."""
        return self.take(torch.arange(start, stop))

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat draws at ``index`` (ascending), each site ``[len(index), *shape]``; only the blocks
        holding them are drawn, one at a time."""
        index = torch.as_tensor(index, dtype=torch.long)
        parts: list[dict[str, torch.Tensor]] = []
        chain, within = index // self.num_draws, index % self.num_draws
        key = chain * (self.num_draws // self.block + 1) + within // self.block
        for k in torch.unique_consecutive(key).tolist():
            sel = key == k
            c, b = int(chain[sel][0]), int(within[sel][0]) // self.block
            block = self._block(c, b)
            rows = within[sel] - b * self.block
            parts.append({n: v[rows] for n, v in block.items()})
        if not parts:
            return {n: torch.empty((0,) + tuple(s)) for n, s, _ in self.approximation.layout.sites}
        return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

    def materialise(self) -> dict[str, torch.Tensor]:
        """All draws, ``{site: [chain, draw, *shape]}``."""
        flat = self.get(0, len(self))
        return {k: v.reshape((self.num_chains, self.num_draws) + tuple(v.shape[1:])) for k, v in flat.items()}

    def state(self) -> dict:
        """What a posterior file stores besides the approximation (no draws)."""
        return {"num_chains": self.num_chains, "num_draws": self.num_draws, "seed": self.seed, "block": self.block}
