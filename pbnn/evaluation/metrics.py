"""Metrics on a :class:`pbnn.Prediction` (or class probabilities ``[N, C]``, ``[N]`` for binary)
and the targets; :func:`evaluate` runs the relevant set, :func:`table` prints results, and
:func:`agreement`, :func:`total_variation`, :func:`wasserstein2` compare with a reference posterior.

Example:
    >>> import torch, pbnn
    >>> from pyro.distributions import Normal
    >>> pred = pbnn.Prediction(torch.zeros(2, 3, 1), Normal(torch.zeros(2, 3), 1.0))
    >>> round(pbnn.metrics.nll(pred, torch.zeros(3)), 4)   # -log N(0 | 0, 1)
    0.9189
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pyro.distributions as dist
import torch

from pbnn.engine.optim import seeded
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import Prediction, _base

__all__ = [
    # regression
    "rmse",
    "nll",
    "coverage",
    "coverage_test",
    "pit",
    "pit_calibration_curve",
    "pit_calibration_error",
    "crps",
    # classification
    "class_probs",
    "accuracy",
    "brier",
    "calibration_bins",
    "ece",
    "adaptive_ece",
    "mce",
    "classwise_ece",
    "entropy",
    "mutual_information",
    "ood_auroc",
    # fidelity to a reference posterior
    "agreement",
    "total_variation",
    "wasserstein2",
    # reports
    "evaluate",
    "table",
]

# A probability of exactly 0 on the true class would give NLL = inf; clip it so one
# confident mistake costs at most -log(1e-12) = 27.6 nats.
PROB_FLOOR = 1e-12


# =============================================================================== input checks
def class_probs(pred) -> torch.Tensor:
    """Predictive class probabilities ``[N, C]`` (float64) from a Prediction or an array.

    A Bernoulli prediction or a 1-D array (P(y=1)) becomes two columns ``[1 - p, p]``.
    Raises ValueError for probabilities outside [0, 1] or rows that do not sum to 1.

    Example:
        >>> import pbnn
        >>> pbnn.metrics.class_probs([0.25, 1.0])
        tensor([[0.7500, 0.2500],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    if isinstance(pred, Prediction):
        if not pred.is_classification:
            raise ValueError("this metric needs a classification Prediction (Categorical or Bernoulli likelihood)")
        p = pred.probs.detach().double()
        return torch.stack([1 - p, p], -1) if p.dim() == 1 else p
    if isinstance(pred, torch.Tensor):
        p = pred.detach().to(torch.float64)
    else:
        p = torch.as_tensor(np.asarray(pred, dtype=np.float64))
    if p.dim() == 1:
        p = torch.stack([1 - p, p], -1)
    if p.dim() != 2:
        raise ValueError(f"probabilities must have shape [N, C] (or [N] for binary), got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]; pass softmax outputs, not logits")
    sums = p.sum(-1)
    bad = (sums - 1).abs() > 1e-4  # float32 softmax rows sum to 1 within ~1e-6
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"probabilities must sum to 1 over classes; row {i} sums to {float(sums[i]):.6f}. "
            "Pass softmax outputs (torch.softmax(logits, -1)), not logits or unnormalised scores"
        )
    return p


def _labels(y, n: int, num_classes: int) -> torch.Tensor:
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels must have shape [N] = [{n}] to match the predictions, got {tuple(y.shape)}; "
            "pass one class index per predicted point"
        )
    if y.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.is_floating_point():
        bad = ~torch.isfinite(y) | (y != torch.round(y))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must be integer class indices, got non-integer value {y[i].item()!r} at point {i}; "
                "pass integer labels (they are never truncated)"
            )
    elif y.dtype == torch.bool:
        y = y.long()
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes; found [{int(y.min())}, {int(y.max())}]"
        )
    return y


def _probs_labels(pred, y) -> tuple[torch.Tensor, torch.Tensor]:
    p = class_probs(pred)
    return p, _labels(y, p.shape[0], p.shape[1]).to(p.device)


def _regression(pred, what: str) -> Prediction:
    if not isinstance(pred, Prediction) or pred.is_classification:
        raise ValueError(f"{what} needs a regression pbnn.Prediction (e.g. post.predict(x))")
    return pred


def _targets(pred: Prediction, y) -> torch.Tensor:
    """Targets in the shape of the predictive mean (``[N]`` or ``[N, D]``).

    ``[N, 1]`` is accepted for a single output (and ``[N]`` for ``[N, 1]``); any other shape
    is a ValueError: targets are never broadcast against the points or reshaped across them.
    """
    mean = pred.mean
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"regression targets must be real numbers, got dtype {y.dtype}")
    y = y.to(mean.device, mean.dtype)
    shape, want = tuple(y.shape), tuple(mean.shape)
    if shape != want and not (y.numel() == mean.numel() and shape[:1] == want[:1] and 1 in (shape + want)[1:]):
        raise ValueError(
            f"targets have shape {shape} but the prediction is for shape {want}; pass one target per "
            f"point ({want[0]} point(s)), in the shape of pred.mean"
        )
    if not torch.isfinite(y).all():
        raise ValueError("targets contain NaN or inf; drop those points before scoring")
    return y.reshape(mean.shape)


# =============================================================================== regression
def rmse(pred: Prediction, y: torch.Tensor) -> float:
    """Root mean squared error of the predictive mean.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 2, 1), Normal(torch.zeros(1, 2), 1.0))
        >>> pbnn.metrics.rmse(pred, torch.tensor([3.0, -3.0]))
        3.0
    """
    y = _targets(_regression(pred, "rmse"), y)
    return float((pred.mean - y).pow(2).mean().sqrt())


def nll(pred, y: torch.Tensor, *, moment_matched: bool = False) -> float:
    """Mean negative log density of the predictive mixture over draws (``moment_matched=True``:
    of a Gaussian with its mean and variance). Class probabilities are floored at ``PROB_FLOOR``,
    for a classification Prediction too: ``nll(pred, y) == nll(pred.probs, y)``.

    Example:
        >>> import pbnn
        >>> round(pbnn.metrics.nll([[0.5, 0.5], [0.2, 0.8]], [0, 1]), 4)   # (log 2 - log 0.8) / 2
        0.4581
    """
    if not isinstance(pred, Prediction) or pred.is_classification:
        if moment_matched:
            raise ValueError("moment_matched=True is for regression; a classification NLL is already exact")
        p, y = _probs_labels(pred, y)  # the mixture's probabilities, floored like any others
        return float(-p.gather(1, y[:, None]).clamp_min(PROB_FLOOR).log().mean()) if len(y) else float("nan")
    y = _targets(pred, y)
    if moment_matched:
        return float(-torch.distributions.Normal(pred.mean, pred.stddev).log_prob(y).mean())
    return float(-pred.log_prob(y).mean())


def coverage(pred: Prediction, y: torch.Tensor, prob: float = 0.9) -> float:
    """Fraction of targets inside the central ``prob`` predictive interval.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 3, 1), Normal(torch.zeros(1, 3), 1.0))
        >>> round(pbnn.metrics.coverage(pred, torch.tensor([0.0, 1.0, 2.0]), 0.9), 4)   # interval +-1.645
        0.6667
    """
    pred = _regression(pred, "coverage")
    y = _targets(pred, y)
    lo, hi = pred.interval(prob)
    return float(((y >= lo) & (y <= hi)).float().mean())


def coverage_test(pred: Prediction, y: torch.Tensor, prob: float = 0.9, alpha: float = 0.01) -> dict:
    """Binomial test of the central ``prob`` interval's coverage (independent test points):
    ``{"coverage", "expected", "p_value", "verdict"}``, verdict ``"under-dispersed"`` (too
    narrow), ``"over-dispersed"`` or ``"ok"`` at level ``alpha``.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 500, 1), Normal(torch.zeros(1, 500), 0.3))
        >>> pbnn.metrics.coverage_test(pred, torch.randn(500))["verdict"]
        'under-dispersed'
    """
    from scipy.stats import binomtest

    pred = _regression(pred, "coverage_test")
    lo, hi = pred.interval(prob)
    y = _targets(pred, y).reshape(lo.shape)
    inside = ((y >= lo) & (y <= hi)).reshape(-1)
    k, n = int(inside.sum()), inside.numel()
    p_value = binomtest(k, n, prob).pvalue
    verdict = "ok" if p_value >= alpha else ("under-dispersed" if k / n < prob else "over-dispersed")
    return {"coverage": k / n, "expected": prob, "p_value": float(p_value), "verdict": verdict}


def pit(pred: Prediction, y: torch.Tensor) -> torch.Tensor:
    """Probability integral transform: the predictive CDF at each target, ``[N]`` / ``[N, D]``
    (uniform when calibrated, U-shaped when overconfident).

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 2, 1), Normal(torch.zeros(1, 2), 1.0))
        >>> pbnn.metrics.pit(pred, torch.tensor([0.0, 10.0]))
        tensor([0.5000, 1.0000])
    """
    pred = _regression(pred, "pit")
    return pred.cdf(_targets(pred, y))


def pit_calibration_curve(pred: Prediction, y: torch.Tensor, num_levels: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """Regression calibration curve (Kuleshov et al. 2018): for levels ``p`` in (0, 1), the fraction
    of targets with PIT <= ``p``: ``(expected, observed)``."""
    return _pit_curve(pit(pred, y).reshape(-1).double().cpu().numpy(), num_levels)


def _pit_curve(u: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    levels = np.linspace(0, 1, num_levels + 2)[1:-1]
    observed = (u[None, :] <= levels[:, None]).mean(1) if u.size else np.full(num_levels, np.nan)
    return levels, observed


def pit_calibration_error(pred: Prediction, y: torch.Tensor, num_levels: int = 19) -> float:
    """Mean absolute gap of :func:`pit_calibration_curve` (calibrated: ~``0.3 / sqrt(N)``).

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 4000, 1), Normal(torch.zeros(1, 4000), 0.5))
        >>> pbnn.metrics.pit_calibration_error(pred, torch.randn(4000)) > 0.05   # too narrow: 0.10 in theory
        True
    """
    expected, observed = pit_calibration_curve(pred, y, num_levels)
    return float(np.abs(observed - expected).mean())


def crps(pred: Prediction, y: torch.Tensor, num_samples: int = 1000, seed: int | None = 0) -> float:
    """Continuous ranked probability score ``E|X - y| - E|X - X'| / 2`` (fair estimator from at
    least ``num_samples`` predictive draws per point), mean over points; lower is better.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 1, 1), Normal(torch.zeros(1, 1), 1.0))
        >>> round(pbnn.metrics.crps(pred, torch.zeros(1), num_samples=20000), 2)   # (sqrt 2 - 1)/sqrt pi
        0.23
    """
    return float(_crps_points(_regression(pred, "crps"), y, num_samples, seed).mean())


def _crps_points(pred: Prediction, y, num_samples: int, seed: int | None) -> torch.Tensor:
    """The CRPS of every target (``[N]`` / ``[N, D]``, float64)."""
    y = _targets(pred, y)
    per_draw = max(1, math.ceil(num_samples / pred.num_draws))
    with seeded(seed), torch.no_grad():
        x = pred.sample(per_draw).double()  # [M, N] / [M, N, D]
    m = x.shape[0]
    y = y.double()
    term1 = (x - y).abs().mean(0)
    if m < 2:
        return term1
    # sum_{i,j} |x_i - x_j| = 2 sum_i (2 i - m - 1) x_(i) over sorted samples, i = 1..m
    xs = x.sort(0).values
    w = (2 * torch.arange(1, m + 1, dtype=xs.dtype, device=xs.device) - m - 1).reshape((m,) + (1,) * (xs.dim() - 1))
    term2 = 2 * (w * xs).sum(0) / (m * (m - 1))
    return term1 - term2 / 2


# =============================================================================== classification
def accuracy(pred, y) -> float:
    """Fraction of points whose most probable class is the label.

    Example:
        >>> import pbnn
        >>> pbnn.metrics.accuracy([[0.9, 0.1], [0.4, 0.6]], [0, 0])
        0.5
    """
    p, y = _probs_labels(pred, y)
    return float((p.argmax(-1) == y).double().mean())


def brier(pred, y) -> float:
    """Multi-class Brier score: mean of ``sum_c (p_c - 1[y = c])^2`` (0 best, 2 worst; twice the
    one-column binary score).

    Example:
        >>> import pbnn
        >>> pbnn.metrics.brier([[1.0, 0.0], [0.5, 0.5]], [0, 1])   # (0 + 0.5) / 2
        0.25
    """
    p, y = _probs_labels(pred, y)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float((p - onehot).pow(2).sum(-1).mean())


def _bin_index(conf: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Equal-width bins ``(b/B, (b+1)/B]``; a confidence of exactly 0 goes to the first bin."""
    return (torch.ceil(conf * num_bins) - 1).clamp(0, num_bins - 1).long()


def _check_bins(num_bins: int) -> None:
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")


def calibration_bins(pred, y, num_bins: int = 15, adaptive: bool = False) -> dict[str, np.ndarray]:
    """Top-label confidence bins: what a reliability diagram draws and ECE / MCE summarise.

    Args:
        pred: classification Prediction or probabilities ``[N, C]``.
        y: labels ``[N]``.
        num_bins: number of bins.
        adaptive: equal-mass bins (each holds ``N / num_bins`` points, by sorted
            confidence) instead of equal-width bins on [0, 1].

    Returns:
        ``{"confidence", "accuracy", "count", "lower", "upper"}`` per bin; empty bins have
        count 0 and NaN confidence / accuracy. For adaptive bins ``lower`` / ``upper`` are
        the smallest / largest confidence in the bin.
    """
    _check_bins(num_bins)
    p, y = _probs_labels(pred, y)
    conf, label = p.max(-1)
    correct = (label == y).double()
    if adaptive:
        groups = torch.tensor_split(torch.argsort(conf), num_bins)
    else:
        idx = _bin_index(conf, num_bins)
        groups = [(idx == b).nonzero()[:, 0] for b in range(num_bins)]
    out = {k: np.full(num_bins, np.nan) for k in ("confidence", "accuracy", "lower", "upper")}
    out["count"] = np.zeros(num_bins, dtype=np.int64)
    for b, g in enumerate(groups):
        if not adaptive:
            out["lower"][b], out["upper"][b] = b / num_bins, (b + 1) / num_bins
        if len(g) == 0:
            continue
        out["count"][b] = len(g)
        out["confidence"][b] = float(conf[g].mean())
        out["accuracy"][b] = float(correct[g].mean())
        if adaptive:
            out["lower"][b], out["upper"][b] = float(conf[g].min()), float(conf[g].max())
    return out


def ece(pred, y, num_bins: int = 15, adaptive: bool = False) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` (L1).

    Top-label confidence, ``num_bins`` equal-width bins on [0, 1] (Guo et al. 2017), or
    equal-mass bins with ``adaptive=True`` (Nixon et al. 2019). A calibrated predictor
    scores about ``sqrt(2 / pi) * sum_b (n_b / N) sqrt(acc_b (1 - acc_b) / n_b)`` (the
    binomial noise in each bin), not exactly 0.

    Example:
        >>> import pbnn
        >>> # always 90% sure, right 3 times out of 4: |0.75 - 0.9|
        >>> round(pbnn.metrics.ece([[0.9, 0.1]] * 4, [0, 0, 0, 1]), 4)
        0.15
    """
    b = calibration_bins(pred, y, num_bins, adaptive)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    keep = b["count"] > 0
    return float((b["count"][keep] / n * np.abs(b["accuracy"][keep] - b["confidence"][keep])).sum())


def adaptive_ece(pred, y, num_bins: int = 15) -> float:
    """ECE with equal-mass bins: :func:`ece` with ``adaptive=True``.

    Example:
        >>> import pbnn
        >>> round(pbnn.metrics.adaptive_ece([[0.9, 0.1]] * 4, [0, 0, 0, 1], num_bins=1), 4)
        0.15
    """
    return ece(pred, y, num_bins, adaptive=True)


def mce(pred, y, num_bins: int = 15, adaptive: bool = False) -> float:
    """Maximum calibration error: the largest ``|accuracy_b - confidence_b|`` over non-empty bins.

    Example:
        >>> import pbnn
        >>> round(pbnn.metrics.mce([[0.9, 0.1], [0.6, 0.4]], [0, 1], num_bins=10), 4)
        0.6
    """
    b = calibration_bins(pred, y, num_bins, adaptive)
    keep = b["count"] > 0
    return float(np.abs(b["accuracy"][keep] - b["confidence"][keep]).max()) if keep.any() else float("nan")


def classwise_ece(pred, y, num_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019): the equal-width-binned ECE of each ``p_c`` against
    ``1[y = c]``, averaged over classes.

    Example:
        >>> import pbnn
        >>> round(pbnn.metrics.classwise_ece([[0.9, 0.1]] * 4, [0, 0, 0, 1]), 4)
        0.15
    """
    _check_bins(num_bins)
    p, y = _probs_labels(pred, y)
    n, num_classes = p.shape
    if n == 0:
        return float("nan")
    total = 0.0
    for c in range(num_classes):
        pc, hit = p[:, c], (y == c).double()
        idx = _bin_index(pc, num_bins)
        gap = torch.bincount(idx, weights=hit - pc, minlength=num_bins).abs()  # |sum(hit) - sum(p)| per bin
        total += float(gap.sum() / n)  # = sum_b (n_b / N) |mean hit - mean p| over non-empty bins
    return total / num_classes


def entropy(pred) -> torch.Tensor:
    """Entropy of the predictive class distribution (total uncertainty, nats), ``[N]``.

    Example:
        >>> import pbnn
        >>> pbnn.metrics.entropy([[0.5, 0.5], [1.0, 0.0]])
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    if isinstance(pred, Prediction):
        class_probs(pred)  # checks it is a classification prediction
        return pred.entropy
    return torch.special.entr(class_probs(pred)).sum(-1)  # entr(0) = 0: no 0 * log 0 = nan


def mutual_information(pred: Prediction) -> torch.Tensor:
    """Mutual information between the label and the weights (epistemic uncertainty), ``[N]``.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Categorical
        >>> logits = torch.tensor([[[9.0, 0.0]], [[0.0, 9.0]]])   # two confident draws that disagree
        >>> round(float(pbnn.metrics.mutual_information(pbnn.Prediction(logits, Categorical(logits=logits)))[0]), 3)
        0.692
    """
    if not isinstance(pred, Prediction) or not pred.is_classification:
        raise ValueError("mutual_information needs a classification pbnn.Prediction with posterior draws")
    return pred.mutual_information


_SCORES = {"entropy": entropy, "mutual_information": mutual_information}


def _ood_scores(s, score: str) -> torch.Tensor:
    if isinstance(s, Prediction):
        if score == "max_prob":
            return -class_probs(s).max(-1).values
        if score not in _SCORES:
            raise ValueError(f"score must be 'entropy', 'mutual_information' or 'max_prob', got {score!r}")
        return _SCORES[score](s).double()
    s = torch.as_tensor(np.asarray(s, dtype=np.float64)).reshape(-1)
    if not torch.isfinite(s).all():
        raise ValueError("OOD scores must be finite")
    return s


def ood_auroc(in_dist, out_dist, score: str = "entropy") -> float:
    """AUROC for telling OOD points from in-distribution ones (1 perfect, 0.5 chance).

    ``in_dist`` / ``out_dist``: Predictions scored by ``score`` (``"entropy"``,
    ``"mutual_information"`` or ``"max_prob"``) or arrays of scores (larger = more OOD).

    Example:
        >>> import pbnn
        >>> pbnn.metrics.ood_auroc([0.1, 0.2, 0.3], [0.25, 0.9])
        0.8333333333333334
    """
    a, b = _ood_scores(in_dist, score), _ood_scores(out_dist, score)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ood_auroc needs at least one in-distribution and one OOD point")
    # Mann-Whitney U from average ranks (ties get the mean rank)
    scores = torch.cat([a.cpu(), b.cpu()]).numpy()
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    u = ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


# =============================================================================== fidelity
def _prediction(p, x, num_samples, what):
    if isinstance(p, Posterior):
        if x is None:
            raise ValueError(f"{what} of two Posteriors needs the inputs x at which to compare their predictives")
        return p.predict(x, num_samples)
    return p


def _class_prob_pair(pred, reference, x, num_samples, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = class_probs(_prediction(pred, x, num_samples, what))
    q = class_probs(_prediction(reference, x, num_samples, what))
    if p.shape != q.shape:
        raise ValueError(f"predictions have shapes {tuple(p.shape)} and {tuple(q.shape)}; they must match")
    return p, q


def agreement(pred, reference, x=None, num_samples: int | None = None) -> float:
    """Top-1 agreement of two predictives (Predictions, probabilities, or Posteriors with ``x``):
    the fidelity metric of the NeurIPS 2021 approximate-inference competition.

    Example:
        >>> import pbnn
        >>> pbnn.metrics.agreement([[0.9, 0.1], [0.4, 0.6]], [[0.6, 0.4], [0.7, 0.3]])
        0.5
    """
    p, q = _class_prob_pair(pred, reference, x, num_samples, "agreement")
    return float((p.argmax(-1) == q.argmax(-1)).double().mean())


def total_variation(pred, reference, x=None, num_samples: int | None = None) -> float:
    """Mean total-variation distance ``0.5 sum_c |p_c - q_c|`` between predictive class distributions.

    Example:
        >>> import pbnn
        >>> pbnn.metrics.total_variation([[0.9, 0.1], [0.5, 0.5]], [[0.6, 0.4], [0.5, 0.5]])
        0.15000000000000002
    """
    p, q = _class_prob_pair(pred, reference, x, num_samples, "total_variation")
    return float(0.5 * (p - q).abs().sum(-1).mean())


def _quantile_atoms(d: torch.distributions.Distribution, per_draw: int) -> torch.Tensor:
    """Sorted atoms ``[S * L, N, ...]`` standing in for the mixture: each draw's quantiles at
    ``(l + 1/2) / L`` (for a Normal rescaled to the component's exact variance)."""
    loc, scale = d.loc.detach().double(), d.scale.detach().double()
    u = (torch.arange(per_draw, dtype=torch.float64, device=loc.device) + 0.5) / per_draw
    u = u.reshape((-1,) + (1,) * loc.dim())
    if isinstance(d, dist.Normal):
        z = torch.distributions.Normal(0.0, 1.0).icdf(u)
        atoms = loc + scale * z / z.pow(2).mean().sqrt()
    else:
        atoms = type(d)(loc, scale).icdf(u)
    return atoms.reshape((-1,) + tuple(loc.shape[1:])).sort(0).values


def _location_scale(pred: Prediction) -> torch.distributions.Distribution:
    d = _base(pred.conditional)[0]
    if not isinstance(d, (dist.Normal, dist.Laplace, dist.Cauchy)):
        raise ValueError(
            f"wasserstein2 needs predictive quantiles; {type(d).__name__} has none in torch "
            "(use a Normal, Laplace or Cauchy likelihood)"
        )
    return d


def wasserstein2(pred, reference, x=None, num_samples: int | None = None, per_draw: int = 64) -> float:
    """Mean over points of the 1-D Wasserstein-2 distance between two regression predictives
    (Predictions, or Posteriors with ``x``), exact between ``per_draw`` quantile atoms per draw:
    no sampling noise, exact for Gaussians, ~1% for skewed mixtures at ``per_draw=64``.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> a = pbnn.Prediction(torch.zeros(1, 1, 1), Normal(torch.zeros(1, 1), 1.0))
        >>> b = pbnn.Prediction(torch.zeros(1, 1, 1), Normal(torch.full((1, 1), 3.0), 5.0))
        >>> round(pbnn.metrics.wasserstein2(a, b), 4)   # sqrt(3^2 + (5 - 1)^2)
        5.0
    """
    p = _regression(_prediction(pred, x, num_samples, "wasserstein2"), "wasserstein2")
    q = _regression(_prediction(reference, x, num_samples, "wasserstein2"), "wasserstein2")
    if p.mean.shape != q.mean.shape:
        raise ValueError(f"predictions are for shapes {tuple(p.mean.shape)} and {tuple(q.mean.shape)}; they must match")
    da, db = _location_scale(p), _location_scale(q)
    na, nb = da.loc.shape[0] * per_draw, db.loc.shape[0] * per_draw
    # both quantile functions are steps on [0, 1]: integrate over the merged breakpoints exactly
    f64 = {"dtype": torch.float64, "device": da.loc.device}
    breaks = torch.cat([torch.arange(na + 1, **f64) / na, torch.arange(1, nb, **f64) / nb]).unique()
    mid, width = (breaks[1:] + breaks[:-1]) / 2, breaks.diff()
    ia, ib = (mid * na).long().clamp_max(na - 1), (mid * nb).long().clamp_max(nb - 1)
    width = width.reshape((-1,) + (1,) * (da.loc.dim() - 1))
    n = da.loc.shape[1]
    step = max(1, int(2e6 // (len(mid) * da.loc[0, :1].numel())))  # points per chunk: ~2M atoms at a time
    w2sq = []
    for i in range(0, n, step):
        sl = slice(i, i + step)
        a = _quantile_atoms(type(da)(da.loc[:, sl], da.scale[:, sl]), per_draw)
        b = _quantile_atoms(type(db)(db.loc[:, sl], db.scale[:, sl]), per_draw)
        w2sq.append((width * (a[ia] - b[ib]).pow(2)).sum(0))
    return float(torch.cat(w2sq).sqrt().mean())


# =============================================================================== reports
def evaluate(post, x, y=None, *, num_samples: int | None = None, num_bins: int = 15, seed: int | None = 0) -> dict:
    """All the standard metrics in one call: ``{name: float}``.

    Args:
        post: a :class:`pbnn.Posterior` (predicted at ``x``) or a :class:`pbnn.Prediction`
            (then pass ``x=None``).
        x, y: test inputs and targets; or, with a Posterior, ``x`` an iterable of ``(x, y)``
            batches (a ``DataLoader``) and no ``y``: the metrics are streamed over the batches
            (one batch's prediction in memory at a time, per-point results kept). They equal
            those of the whole test set at once, except ``crps``, whose Monte Carlo draws
            differ (each batch uses ``seed``).
        num_samples: posterior draws for the predictive (default: all stored).
        num_bins: bins for the ECE-type metrics.
        seed: seed for fresh draws and the CRPS samples.

    Keys: classification ``accuracy, nll, brier, ece, adaptive_ece, mce, classwise_ece, entropy,
    mutual_information``; regression ``rmse, nll, crps, coverage_50/90/95, pit_error, mean_sd``.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 4, 1), Normal(torch.zeros(1, 4), 1.0))
        >>> " ".join(sorted(pbnn.evaluate(pred, None, torch.zeros(4)))[:4])
        'coverage_50 coverage_90 coverage_95 crps'
    """
    if isinstance(post, Posterior) and y is None and x is not None and not isinstance(x, (torch.Tensor, np.ndarray)):
        return _evaluate_batches(post, x, num_samples, num_bins, seed)
    if y is None:
        raise ValueError("evaluate needs the targets y (or, with a Posterior, a loader of (x, y) batches as x)")
    if isinstance(post, Prediction):
        if x is not None:
            raise ValueError("evaluate got a Prediction and inputs x; pass x=None with a Prediction")
        pred = post
    elif isinstance(post, Posterior):
        if x is None:
            raise ValueError("evaluate needs the test inputs x to predict with a Posterior")
        pred = post.predict(x, num_samples, seed=seed)
    else:
        raise ValueError(
            f"evaluate needs a pbnn.Posterior (with x) or a pbnn.Prediction (with x=None), got {type(post).__name__}"
        )
    _check_bins(num_bins)
    if pred.is_classification:
        p, labels = _probs_labels(pred, y)
        return {
            "accuracy": accuracy(p, labels),
            "nll": nll(pred, labels),
            "brier": brier(p, labels),
            "ece": ece(p, labels, num_bins),
            "adaptive_ece": adaptive_ece(p, labels, num_bins),
            "mce": mce(p, labels, num_bins),
            "classwise_ece": classwise_ece(p, labels, num_bins),
            "entropy": float(pred.entropy.mean()),
            "mutual_information": float(pred.mutual_information.mean()),
        }
    y = _targets(pred, y)
    return {
        "rmse": rmse(pred, y),
        "nll": nll(pred, y),
        "crps": crps(pred, y, seed=seed),
        "coverage_50": coverage(pred, y, 0.5),
        "coverage_90": coverage(pred, y, 0.9),
        "coverage_95": coverage(pred, y, 0.95),
        "pit_error": pit_calibration_error(pred, y),
        "mean_sd": float(pred.stddev.mean()),
    }


def _evaluate_batches(post, loader, num_samples, num_bins: int, seed) -> dict:
    """:func:`evaluate` streamed over ``(x, y)`` batches: per-point results joined, then reduced."""
    _check_bins(num_bins)
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(**values):
        for k, v in values.items():
            parts.setdefault(k, []).append(v.detach().double().reshape(-1) if k != "p" else v)

    classification = None
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"evaluate(post, loader) needs batches (x, y); batch {i} is a {type(batch).__name__}"
                + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
            )
        xb, yb = batch
        pred = post.predict(xb, num_samples, seed=seed)
        if classification is not None and pred.is_classification != classification:
            raise ValueError(f"batch {i} gives a different kind of prediction than the batches before it")
        classification = pred.is_classification
        if classification:
            p, labels = _probs_labels(pred, yb)
            keep(p=p, labels=labels, entropy=pred.entropy, mi=pred.mutual_information)
            continue
        yb = _targets(pred, yb)
        inside = {}
        for prob in (0.5, 0.9, 0.95):
            lo, hi = pred.interval(prob)
            inside[f"c{round(prob * 100)}"] = ((yb >= lo) & (yb <= hi)).reshape(-1)
        keep(
            err2=(pred.mean - yb) ** 2,
            nll=-pred.log_prob(yb),
            crps=_crps_points(pred, yb, 1000, seed),
            pit=pred.cdf(yb),
            sd=pred.stddev,
            **inside,
        )
    if classification is None:
        raise ValueError("evaluate got an empty loader (no (x, y) batches)")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    if classification:
        p, labels = cat["p"], cat["labels"].long()
        return {
            "accuracy": accuracy(p, labels),
            "nll": nll(p, labels),
            "brier": brier(p, labels),
            "ece": ece(p, labels, num_bins),
            "adaptive_ece": adaptive_ece(p, labels, num_bins),
            "mce": mce(p, labels, num_bins),
            "classwise_ece": classwise_ece(p, labels, num_bins),
            "entropy": float(cat["entropy"].mean()),
            "mutual_information": float(cat["mi"].mean()),
        }
    expected, observed = _pit_curve(cat["pit"].numpy(), 19)
    return {
        "rmse": float(cat["err2"].mean().sqrt()),
        "nll": float(cat["nll"].mean()),
        "crps": float(cat["crps"].mean()),
        "coverage_50": float(cat["c50"].mean()),
        "coverage_90": float(cat["c90"].mean()),
        "coverage_95": float(cat["c95"].mean()),
        "pit_error": float(np.abs(observed - expected).mean()),
        "mean_sd": float(cat["sd"].mean()),
    }


def table(results: Mapping, digits: int = 3) -> str:
    """Format :func:`evaluate` results as a text table: one row per entry of ``{name: {metric: value}}``.

    A single result dict (``{metric: value}``) gives a one-row table.

    Example:
        >>> import pbnn
        >>> print(pbnn.metrics.table({"map": {"nll": 0.51, "ece": 0.1}, "svi": {"nll": 0.42, "ece": 0.03}}))
        method    nll    ece
        ------  -----  -----
        map     0.510  0.100
        svi     0.420  0.030
    """
    if results and not isinstance(next(iter(results.values())), Mapping):
        results = {"": results}
    cols: list[str] = []
    for r in results.values():
        cols += [k for k in r if k not in cols]
    first = max([len("method")] + [len(str(k)) for k in results])

    def fmt(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    cells = {m: [fmt(r[c]) if c in r else "-" for c in cols] for m, r in results.items()}
    widths = [max([len(c)] + [len(cells[m][j]) for m in results]) for j, c in enumerate(cols)]
    lines = ["method".ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(cols, widths))]
    lines.append("-" * first + "".join("  " + "-" * w for w in widths))
    for m in results:
        lines.append(str(m).ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(cells[m], widths)))
    return "\n".join(lines)
