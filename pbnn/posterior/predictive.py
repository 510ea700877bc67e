"""Posterior predictive: network outputs per draw, and everything derived from them.

For a :class:`pbnn.BNN` the network is evaluated for all draws at once with
``torch.func.vmap`` over ``torch.func.functional_call``, in chunks of draws so memory
stays bounded however many draws there are. Hand-written Pyro models are run once per
draw (conditioned on it) and their ``"obs"`` distributions stacked.

A :class:`Prediction` holds the conditional distribution ``p(y | x, theta_s)`` for every
draw ``s`` (batch shape ``[S, N]``) and reduces it over draws.

Example:
    >>> import torch, pbnn
    >>> from pyro.distributions import Normal
    >>> pred = pbnn.Prediction(torch.zeros(4, 3, 1), Normal(torch.zeros(4, 3), 1.0))
    >>> pred.mean.shape, float(pred.variance[0])
    (torch.Size([3]), 1.0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import Distribution, Independent
from torch.func import functional_call

from pbnn.core.model import eval_mode

__all__ = [
    "Prediction",
    "StreamedPrediction",
    "mixture_quantile",
    "activations_per_point",
    "predict_bnn",
    "predict_pyro",
    "predict_params",
    "predict_bn_refresh",
    "has_batchnorm",
    "chunked_vmap",
]

_CLASSIFICATION = (dist.Categorical, dist.Bernoulli, dist.OneHotCategorical)


def _base(d: Distribution) -> tuple[Distribution, int]:
    """Strip ``Independent`` wrappers; return the base and how many dims they reinterpreted."""
    n = 0
    while isinstance(d, Independent):
        n += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, n


def _probability(p, name: str) -> float:
    """``p`` as a float strictly inside (0, 1), or a ValueError naming the fix."""
    try:
        value = float(p)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number in (0, 1), e.g. 0.9 for a 90% interval; got {p!r}") from None
    if not 0 < value < 1:
        hint = f" (a percentage? pass {value / 100:g})" if 1 < value < 100 else ""
        raise ValueError(f"{name} must lie strictly in (0, 1), e.g. 0.9 for a 90% interval; got {p!r}{hint}")
    return value


class Prediction:
    """Predictive distribution at ``N`` inputs, as a mixture over ``S`` posterior draws.

    Attributes:
        samples: network outputs per draw, ``[S, N, out_dim]``.
        conditional: ``p(y | x, theta_s)`` with batch shape ``[S, N]``.

    Regression: ``mean`` and ``variance`` are those of the mixture; the variance splits
    into ``aleatoric_variance`` (mean over draws of the noise variance) and
    ``epistemic_variance`` (variance over draws of the conditional mean).
    Classification: ``probs`` is the posterior-averaged class probability; ``mean`` equals
    it, ``variance`` is ``probs * (1 - probs)`` and splits the same way; ``entropy`` splits
    into ``aleatoric_entropy`` (expected entropy) and ``mutual_information`` (epistemic).

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Categorical
        >>> logits = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])   # 2 draws that disagree
        >>> pred = pbnn.Prediction(logits, Categorical(logits=logits))
        >>> pred.probs
        tensor([[0.5000, 0.5000]])
        >>> bool(pred.mutual_information[0] > 0.5)
        True
    """

    def __init__(self, samples: torch.Tensor, conditional: Distribution) -> None:
        self.samples = samples
        self.conditional = conditional
        base, _ = _base(conditional)
        self.is_classification = isinstance(base, _CLASSIFICATION)

    @property
    def num_draws(self) -> int:
        return self.samples.shape[0]

    # ---------------------------------------------------------------- moments
    def _per_draw_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        d, _ = _base(self.conditional)
        if isinstance(d, (dist.Categorical, dist.OneHotCategorical)):
            p = d.probs
            return p, p * (1 - p)
        return d.mean, d.variance

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean: ``[N]`` / ``[N, D]`` for regression, class probabilities for classification."""
        return self._per_draw_moments()[0].mean(0)

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        return self._per_draw_moments()[1].mean(0)

    @property
    def epistemic_variance(self) -> torch.Tensor:
        return self._per_draw_moments()[0].var(0, unbiased=False)

    @property
    def variance(self) -> torch.Tensor:
        """Total predictive variance = aleatoric + epistemic (law of total variance)."""
        return self.aleatoric_variance + self.epistemic_variance

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    # ---------------------------------------------------------------- classification
    @property
    def probs(self) -> torch.Tensor:
        """Posterior-averaged class probabilities (``[N, C]``; ``[N]`` = P(y=1) for Bernoulli)."""
        if not self.is_classification:
            raise AttributeError("probs is defined for classification likelihoods only")
        return self.mean

    def _probs_per_draw(self) -> torch.Tensor:
        p = self._per_draw_moments()[0]
        d, _ = _base(self.conditional)
        return torch.stack([1 - p, p], -1) if isinstance(d, dist.Bernoulli) else p

    @staticmethod
    def _entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)

    @property
    def entropy(self) -> torch.Tensor:
        """Entropy of the predictive class distribution (total uncertainty), ``[N]``."""
        return self._entropy(self._probs_per_draw().mean(0))

    @property
    def aleatoric_entropy(self) -> torch.Tensor:
        """Expected entropy over draws (the aleatoric part), ``[N]``."""
        return self._entropy(self._probs_per_draw()).mean(0)

    @property
    def mutual_information(self) -> torch.Tensor:
        """Entropy minus expected entropy: information about the weights (epistemic), ``[N]``."""
        return (self.entropy - self.aleatoric_entropy).clamp_min(0.0)

    # ---------------------------------------------------------------- densities
    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Pointwise log predictive density ``log (1/S) sum_s p(y_i | x_i, theta_s)``, ``[N]``.

        ``y`` is checked as in :meth:`pointwise_log_likelihood` (shape, label dtype and range).
        """
        lp = self.pointwise_log_likelihood(y)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def pointwise_log_likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y_i | x_i, theta_s)`` for every draw and point, ``[S, N]``.

        ``y`` must hold one target per point: ``[N]`` (``[N, 1]`` is accepted for a single
        regression output), ``[N, D]`` for ``D`` outputs; class labels ``[N]`` of whole
        numbers in ``[0, C)`` (``{0, 1}`` for Bernoulli). Anything else is a ValueError
        (never truncated to an integer or broadcast against the points).
        """
        return self.conditional.log_prob(self._check_targets(y))

    def _check_targets(self, y) -> torch.Tensor:
        """``y`` in the dtype and shape ``conditional.log_prob`` takes, or a ValueError."""
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(np.asarray(y))
        if y.is_complex() or y.dtype == torch.bool and not self.is_classification:
            raise ValueError(f"targets must be real numbers (class indices for classification), got dtype {y.dtype}")
        d, _ = _base(self.conditional)
        expected = tuple(self.conditional.batch_shape[1:] + self.conditional.event_shape)
        n = expected[0] if expected else 1
        if isinstance(d, (dist.Categorical, dist.Bernoulli)):
            num = d.logits.shape[-1] if isinstance(d, dist.Categorical) else 2
            if tuple(y.shape) != expected:
                raise ValueError(
                    f"class labels must have shape {list(expected)} (one label per point), got {tuple(y.shape)}"
                    + ("; pass y[:, 0] or y.reshape(-1)" if y.dim() == 2 and y.shape[-1] == 1 else "")
                )
            if y.is_floating_point():
                bad = ~torch.isfinite(y) | (y != torch.round(y))
                if bad.any():
                    i = int(bad.reshape(-1).nonzero()[0, 0])
                    raise ValueError(
                        f"class labels must be whole numbers (class indices), got {y.reshape(-1)[i].item()!r} at "
                        f"point {i}; pass integer labels (y.long() only if they are already whole numbers)"
                    )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num):
                raise ValueError(
                    f"class labels must lie in [0, {num}) for {num} classes; found labels in "
                    f"[{int(y.min())}, {int(y.max())}]"
                )
            return (y.long() if isinstance(d, dist.Categorical) else y.to(d.logits.dtype)).to(d.logits.device)
        y = y.to(self.samples.device, self.samples.dtype)
        if tuple(y.shape) != expected and tuple(y.shape) == expected + (1,) and not self.conditional.event_shape:
            y = y[..., 0]  # [N, 1] for a single output: the canonical [N]
        if tuple(y.shape) != expected:
            raise ValueError(
                f"targets must have shape {list(expected)} to match the {n} predicted point(s), got "
                f"{tuple(y.shape)}; pass one target per point (no broadcasting)"
            )
        return y

    def sample(self, num_per_draw: int = 1) -> torch.Tensor:
        """Predictive draws of ``y``: ``[num_per_draw * S, N, ...]``."""
        y = self.conditional.sample((num_per_draw,))
        return y.reshape((-1,) + tuple(y.shape[2:]))

    # ---------------------------------------------------------------- intervals
    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        """Predictive (mixture) CDF at ``y`` for regression, ``[N]`` / ``[N, D]``."""
        d, _ = _base(self.conditional)
        return d.cdf(torch.as_tensor(y, dtype=self.samples.dtype, device=self.samples.device)).mean(0)

    def quantile(self, q: float) -> torch.Tensor:
        """Quantile ``q`` of the predictive mixture (:func:`mixture_quantile`), regression only."""
        if self.is_classification:
            raise ValueError("quantile is defined for regression; for classification use interval()")
        return mixture_quantile(_base(self.conditional)[0], _probability(q, "q")).to(self.samples.dtype)

    def interval(self, prob: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        """Central ``prob`` interval ``(lower, upper)``.

        Regression: of the predictive distribution of ``y`` (noise included).
        Classification: the central credible interval of the class probabilities over draws.
        """
        prob = _probability(prob, "prob")
        a = (1 - prob) / 2
        if self.is_classification:
            p = self._per_draw_moments()[0]
            return torch.quantile(p, a, dim=0), torch.quantile(p, 1 - a, dim=0)
        return self.quantile(a), self.quantile(1 - a)

    def __repr__(self) -> str:
        kind = "classification" if self.is_classification else "regression"
        return f"Prediction({kind}, draws={self.num_draws}, points={self.samples.shape[1]})"


def mixture_quantile(d: Distribution, q: float, max_iter: int = 100) -> torch.Tensor:
    """Quantile ``q`` of the equal mixture over dim 0 of ``d`` (batch ``[S, ...]``), for all points
    at once: Newton's method on the mixture CDF, in float64, kept inside a shrinking bisection
    bracket (a step that leaves it, or a zero density, bisects instead). Starts at the quantile
    of the moment-matched normal (a few steps from the root for most points); a point stops
    when its step is below ``1e-10`` of the mixture's standard deviation, and later steps
    only touch the points still moving. The bracket starts at
    ``[min_s(mean_s - 12 sd_s), max_s(mean_s + 12 sd_s)]``.

    Example:
        >>> from torch.distributions import Normal
        >>> d = Normal(torch.tensor([[-1.0], [1.0]]), torch.tensor([[1.0], [1.0]]))   # 2 draws, 1 point
        >>> round(float(mixture_quantile(d, 0.75)), 6)
        1.050544
        >>> round(float(mixture_quantile(Normal(torch.zeros(1, 1), 1.0), 0.975)), 6)
        1.959964
    """
    family = type(d)
    shape = d.batch_shape[1:]
    loc, scale = (t.double().expand(d.batch_shape).reshape(d.batch_shape[0], -1) for t in (d.loc, d.scale))
    full = family(loc, scale, validate_args=False)
    mean, sd = full.mean, full.stddev
    lo, hi = (mean - 12 * sd).min(0).values, (mean + 12 * sd).max(0).values
    m = mean.mean(0)
    s = (full.variance.mean(0) + mean.var(0, unbiased=False)).sqrt()
    tol = 1e-10 * s + 1e-300
    x = (m + s * math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=m.dtype))).clamp(lo, hi)
    normal = issubclass(family, torch.distributions.Normal)

    def cdf_pdf(t, loc, scale):
        if normal:  # one standardisation for both
            z = (t - loc) / scale
            pdf = (torch.exp(-0.5 * z * z) / scale).mean(0) / math.sqrt(2 * math.pi)
            return 0.5 * torch.erfc(-z * math.sqrt(0.5)).mean(0), pdf
        part = family(loc, scale, validate_args=False)
        return part.cdf(t).mean(0), part.log_prob(t).exp().mean(0)

    active = torch.arange(x.shape[0])
    for _ in range(max_iter):
        every = len(active) == x.shape[0]
        xa, la, ha = x[active], lo[active], hi[active]
        F, f = cdf_pdf(xa, loc if every else loc[:, active], scale if every else scale[:, active])
        below = F < q
        la, ha = torch.where(below, xa, la), torch.where(below, ha, xa)
        new = xa - (F - q) / f
        new = torch.where((new >= la) & (new <= ha), new, (la + ha) / 2)  # closed: a zero step stays
        moving = (new - xa).abs() > tol[active]
        x[active], lo[active], hi[active] = new, la, ha
        active = active[moving]
        if not len(active):
            break
    return x.reshape(shape)


# ------------------------------------------------------------------------- streaming
# Numbers one block of the streamed predictive may hold: activations of a vmap call, and
# [draws, points] in the quantile pass (64 MB of float32; bounds peak memory, not draws).
BUDGET = 2**24


def _slices(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def activations_per_point(net: nn.Module, x: torch.Tensor) -> int:
    """Numbers the leaf modules of ``net`` output for one input row (probed in eval mode, no
    grad; 1024 when the probe fails), to size chunks of draws and points."""
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(x[:1])
    except Exception:  # a net that does not take a single row: fall back to a wide guess
        total = 1024
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return max(1, total)


class StreamedPrediction(Prediction):
    """A :class:`Prediction` whose summaries are computed over blocks of draws and points, so
    memory does not grow with the number of draws; ``samples`` / ``conditional`` are built
    (and kept) only when asked for.

    Args:
        evaluate: ``evaluate(draws, x_block) -> Prediction`` for flat draws ``{site: [s, ...]}``.
        draws: ``draws(start, stop) -> {site: [stop - start, ...]}``.
        num_draws: ``S``.
        x: the inputs ``[N, ...]``.
        draw_chunk, point_chunk: block sizes of the moments pass.
        quantile_points: points per block of the quantile pass (all draws at once); ``None``
            for ``point_chunk``.

    At construction one pass over the blocks accumulates, in float64, the per-point sums the
    moments need (the means' mean and, by Chan et al.'s pairwise update, their sum of squared
    deviations; the mean noise variance; for classification the mean entropy). ``log_prob``,
    ``pointwise_log_likelihood`` and ``cdf`` stream over the blocks again; ``quantile`` and
    ``interval`` take all draws for ``quantile_points`` points at a time.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> f = torch.randn(50, 7, 1)
        >>> full = pbnn.Prediction(f, Normal(f[..., 0], 0.5))
        >>> streamed = StreamedPrediction(lambda w, x: pbnn.Prediction(w["f"][:, x], Normal(w["f"][:, x, 0], 0.5)),
        ...                               lambda a, b: {"f": f[a:b]}, 50, torch.arange(7), draw_chunk=8, point_chunk=3)
        >>> y = torch.zeros(7)
        >>> torch.allclose(streamed.variance, full.variance), torch.allclose(streamed.log_prob(y), full.log_prob(y))
        (True, True)
    """

    def __init__(
        self,
        evaluate: Callable,
        draws: Callable,
        num_draws: int,
        x: torch.Tensor,
        *,
        draw_chunk: int,
        point_chunk: int,
        quantile_points: int | None = None,
    ) -> None:
        self._evaluate, self._draws, self._x = evaluate, draws, x
        self._num_draws, self._num_points = int(num_draws), len(x)
        self._draw_slices = _slices(self._num_draws, draw_chunk)
        self._point_slices = _slices(self._num_points, point_chunk)
        self._quantile_points = quantile_points or point_chunk
        self._full: Prediction | None = None
        self._template: Prediction | None = None
        n = 0
        mean = m2 = alea = ent = None
        for ds in self._draw_slices:
            w = self._draws(ds.start, ds.stop)
            for ps in self._point_slices:
                blk = self._evaluate(w, self._x[ps])
                m, v = blk._per_draw_moments()  # a block's reductions in its dtype, the running sums in float64
                if mean is None:
                    self.is_classification = blk.is_classification
                    self._dtype = blk.samples.dtype
                    shape = (self._num_points,) + tuple(m.shape[2:])
                    mean, m2, alea = (torch.zeros(shape, dtype=torch.double) for _ in range(3))
                k = m.shape[0]
                mb = m.mean(0)
                delta = mb.double() - mean[ps]
                m2[ps] += ((m - mb) ** 2).sum(0).double() + delta**2 * (n * k / (n + k))
                mean[ps] += delta * (k / (n + k))
                alea[ps] += v.sum(0).double()
                if blk.is_classification:
                    e = self._entropy(blk._probs_per_draw()).sum(0).double()  # [points, *extra dims]
                    if ent is None:
                        ent = torch.zeros((self._num_points,) + tuple(e.shape[1:]), dtype=torch.double)
                    ent[ps] += e
            n += ds.stop - ds.start
        self._mean, self._m2, self._alea, self._ent = mean, m2, alea, ent
        self._single = len(self._draw_slices) == len(self._point_slices) == 1
        if self._single:  # one block: keep it
            self._full = blk

    # ---------------------------------------------------------------- materialised on request
    def _materialised(self) -> Prediction:
        if self._full is None:
            self._full = self._evaluate(self._draws(0, self._num_draws), self._x)
        return self._full

    @property
    def samples(self) -> torch.Tensor:
        """Network outputs per draw ``[S, N, out]``: evaluated (and kept) on first access."""
        return self._materialised().samples

    @property
    def conditional(self) -> Distribution:
        """``p(y | x, theta_s)`` with batch ``[S, N]``: evaluated (and kept) on first access."""
        return self._materialised().conditional

    @property
    def num_draws(self) -> int:
        return self._num_draws

    def _blocks(self):
        for ds in self._draw_slices:
            w = self._draws(ds.start, ds.stop)
            yield ds, [(ps, self._evaluate(w, self._x[ps])) for ps in self._point_slices]

    # ---------------------------------------------------------------- summaries (streamed)
    # One block (a small prediction): Prediction's own reductions of it, the same numbers as before.
    @property
    def mean(self) -> torch.Tensor:
        return self._full.mean if self._single else self._mean.to(self._dtype)

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        return self._full.aleatoric_variance if self._single else (self._alea / self._num_draws).to(self._dtype)

    @property
    def epistemic_variance(self) -> torch.Tensor:
        return self._full.epistemic_variance if self._single else (self._m2 / self._num_draws).to(self._dtype)

    @property
    def entropy(self) -> torch.Tensor:
        if self._single:
            return self._full.entropy
        p = self._mean
        return self._entropy(torch.stack([1 - p, p], -1) if p.dim() == 1 else p).to(self._dtype)

    @property
    def aleatoric_entropy(self) -> torch.Tensor:
        return self._full.aleatoric_entropy if self._single else (self._ent / self._num_draws).to(self._dtype)

    def _check_targets(self, y) -> torch.Tensor:
        if self._single:
            return self._full._check_targets(y)
        if self._template is None:  # one draw at every point: the checks and messages of the full prediction
            self._template = self._evaluate(self._draws(0, 1), self._x)
        return self._template._check_targets(y)

    def pointwise_log_likelihood(self, y: torch.Tensor) -> torch.Tensor:
        if self._single:
            return self._full.pointwise_log_likelihood(y)
        y = self._check_targets(y)
        rows = [torch.cat([blk.conditional.log_prob(y[ps]) for ps, blk in row], -1) for _, row in self._blocks()]
        return torch.cat(rows, 0)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        if self._single:
            return self._full.log_prob(y)
        y = self._check_targets(y)
        total = torch.full((self._num_points,), -math.inf, dtype=torch.double)
        for _, row in self._blocks():
            for ps, blk in row:
                total[ps] = torch.logaddexp(total[ps], torch.logsumexp(blk.conditional.log_prob(y[ps]).double(), 0))
        return (total - math.log(self._num_draws)).to(self._dtype)

    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        if self._single:
            return self._full.cdf(y)
        y = torch.as_tensor(y, dtype=self._dtype)
        total = torch.zeros(self._mean.shape, dtype=torch.double)
        for _, row in self._blocks():
            for ps, blk in row:
                total[ps] += _base(blk.conditional)[0].cdf(y[ps]).double().sum(0)
        return (total / self._num_draws).to(self._dtype)

    def _by_points(self, fn) -> list[torch.Tensor]:
        """``fn(prediction with all draws)`` over blocks of ``quantile_points`` points, joined."""
        if self._single:
            return list(fn(self._full))
        w = self._draws(0, self._num_draws)
        outs = [fn(self._evaluate(w, self._x[ps])) for ps in _slices(self._num_points, self._quantile_points)]
        return [torch.cat(parts, 0) for parts in zip(*outs)]

    def quantile(self, q: float) -> torch.Tensor:
        if self.is_classification:
            raise ValueError("quantile is defined for regression; for classification use interval()")
        q = _probability(q, "q")
        return self._by_points(lambda blk: (blk.quantile(q),))[0]

    def interval(self, prob: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        prob = _probability(prob, "prob")
        lo, hi = self._by_points(lambda blk: blk.interval(prob))
        return lo, hi

    def __repr__(self) -> str:
        kind = "classification" if self.is_classification else "regression"
        return f"Prediction({kind}, draws={self._num_draws}, points={self._num_points}, streamed)"


# ------------------------------------------------------------------------- builders
def chunked_vmap(fn: Callable, stacked: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """``vmap(fn)`` over the leading (draw) dim of ``stacked``, ``chunk_size`` draws at a time."""
    num = next(iter(stacked.values())).shape[0]
    outs = []
    for start in range(0, num, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in stacked.items()}
        outs.append(torch.func.vmap(fn, randomness="different")(chunk))
    return torch.cat(outs, 0)


def default_chunk_size(num_points: int, width: int = 1024) -> int:
    """Draws per vmap chunk so one chunk's activations stay around 64 MB (float32)."""
    return max(1, min(1024, (16 * 2**20) // max(1, num_points * width)))


def predict_bnn(
    model,
    draws: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    x: torch.Tensor,
    chunk_size: int | None = None,
    noise: dict[str, torch.Tensor] | None = None,
) -> Prediction:
    """Vectorised predictive of a :class:`pbnn.BNN` for flat draws ``{site: [S, ...]}``.

    ``noise`` holds the draws of the noise sites when ``draws`` are network tensors only."""
    weights = {n: draws[n] for n in model.bayesian_names} if noise is None else draws
    chunk = chunk_size or default_chunk_size(x.shape[0])
    with eval_mode(model.net), torch.no_grad():
        f = chunked_vmap(lambda w: model.output({**fixed, **w}, x), weights, chunk)
    noise = {n: (draws if noise is None else noise)[n] for n in model.noise_sites(f.shape[-1])}
    return Prediction(f, model.likelihood.conditional(f, noise))


def predict_params(post, draws: dict[str, torch.Tensor], x: torch.Tensor) -> Prediction:
    """Posterior ``predictor`` for draws that carry any network tensors per draw.

    Draws may hold, besides the Bayesian weights, deterministic parameters (one value per
    ensemble member) and BatchNorm buffers; every draw entry whose name is a parameter or
    buffer of the net is passed to the network, which runs in eval mode.
    """
    if not hasattr(post.model, "net"):  # a hand-written Pyro model: per-draw pyro.param values
        # an entry that names no pyro.param is never read from the store, so all may go there
        return predict_pyro(post.model, draws, post.fixed, x, per_draw_params=tuple(draws))
    net = post.model.net
    tensors = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    fixed = {k: v for k, v in post.fixed.items() if k not in draws}
    return predict_bnn(post.model, {k: v for k, v in draws.items() if k in tensors}, fixed, x, noise=draws)


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` has BatchNorm layers in train mode (one in eval mode keeps its statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def predict_bn_refresh(post, draws: dict[str, torch.Tensor], x: torch.Tensor) -> Prediction:
    """Posterior ``predictor`` for nets with BatchNorm: statistics recomputed for every draw.

    A weight draw that was never trained as such (a SWAG draw, an ensemble member) needs
    its own BatchNorm statistics (Maddox et al. 2019). For each draw this runs the training
    inputs through a private copy of the net with only the BatchNorm layers in train mode
    (cumulative averages, ``momentum=None``), then evaluates ``x`` in eval mode. BatchNorm layers
    the user put in eval mode (e.g. in a frozen backbone) keep their statistics.
    (``torch.optim.swa_utils.update_bn`` does not fit: it puts the whole net in train mode,
    so dropout layers would be on during the refresh, and it calls the module with its own
    parameters, while pbnn evaluates each draw functionally.)
    """
    model = post.model
    net = copy.deepcopy(model.net)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in bns:
        m.momentum = None
    names = {n for n, _ in net.named_parameters()}
    outs = []
    with torch.no_grad():
        for s in range(next(iter(draws.values())).shape[0]):
            params = {**post.fixed, **{k: v[s] for k, v in draws.items() if k in names}}
            net.eval()
            for m in bns:
                m.reset_running_stats()
                m.train()
            for chunk in post.data.x.split(1024):
                functional_call(net, params, (chunk,))
            net.eval()
            f = functional_call(net, params, (x,))
            outs.append(f.reshape(f.shape[0], -1))
    f = torch.stack(outs)
    noise = {n: draws[n] for n in model.noise_sites(f.shape[-1])}
    return Prediction(f, model.likelihood.conditional(f, noise))


def _stack(dists: list[Distribution]) -> Distribution:
    """Stack per-draw distributions of one family into one with a leading draw dim."""
    first, ndims = _base(dists[0])
    bases = [_base(d)[0] for d in dists]
    if isinstance(first, (dist.Categorical, dist.Bernoulli, dist.OneHotCategorical)):
        stacked = type(first)(logits=torch.stack([b.logits for b in bases]))
    elif isinstance(first, (dist.Normal, dist.StudentT, dist.Laplace, dist.Cauchy)):
        keys = [k for k in ("df", "loc", "scale") if hasattr(first, k)]
        stacked = type(first)(**{k: torch.stack([getattr(b, k).expand(b.batch_shape) for b in bases]) for k in keys})
    else:
        raise ValueError(
            f"pbnn's predictive supports Normal, StudentT, Laplace, Cauchy, Categorical and Bernoulli "
            f"observation sites; the model's 'obs' site is {type(first).__name__}"
        )
    return stacked.to_event(ndims) if ndims else stacked


def predict_pyro(
    model, draws: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], x: torch.Tensor, per_draw_params=()
) -> Prediction:
    """Predictive of a hand-written Pyro model: one conditioned trace per draw.

    The model's ``pyro.param`` values from the fit (``fixed``, and ``draws[name][s]`` for the
    names in ``per_draw_params``) are put in a private parameter scope, so the global param
    store is neither read nor changed.
    """
    num = next(iter(draws.values())).shape[0]
    dists, outs = [], []
    per_draw = [k for k in draws if k in per_draw_params]
    with torch.no_grad(), pyro.get_param_store().scope():
        for name, value in fixed.items():
            pyro.get_param_store()[name] = value.clone()  # the store marks it requires_grad: not the caller's
        for s in range(num):
            for name in per_draw:  # pyro.param values that differ per draw (ensemble members)
                pyro.get_param_store()[name] = draws[name][s].clone()
            cond = poutine.condition(model, data={k: v[s] for k, v in draws.items()})
            tr = poutine.trace(cond).get_trace(x)
            if "obs" not in tr.nodes:
                raise ValueError("a hand-written Pyro model must observe its targets at a sample site named 'obs'")
            d = tr.nodes["obs"]["fn"]
            dists.append(d)
            base, _ = _base(d)
            outs.append(base.logits if hasattr(base, "logits") else base.mean)
    f = torch.stack(outs)
    if f.dim() == 2:
        f = f[..., None]
    return Prediction(f, _stack(dists))
