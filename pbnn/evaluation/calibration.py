"""Post-hoc recalibration fitted on held-out predictions (minimising the validation NLL with
L-BFGS in float64): :class:`TemperatureScaling`, :class:`VectorScaling`, :class:`VarianceScaling`.
Applying a calibrator returns a new :class:`pbnn.Prediction`; the Posterior is never changed.

Example:
    >>> import torch, pbnn
    >>> from pyro.distributions import Categorical
    >>> g = torch.Generator().manual_seed(0)
    >>> z = 2 * torch.randn(2000, 3, generator=g)                  # true logits
    >>> y = torch.multinomial(z.softmax(-1), 1, generator=g)[:, 0]
    >>> pred = pbnn.Prediction(3 * z[None], Categorical(logits=3 * z[None]))   # overconfident x3
    >>> ts = pbnn.calibration.TemperatureScaling().fit(pred, y)
    >>> round(ts.temperature, 1)
    3.0
    >>> pbnn.metrics.ece(ts(pred), y) < pbnn.metrics.ece(pred, y) / 2
    True
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pbnn.evaluation.metrics import _labels, _regression, _targets
from pbnn.posterior.predictive import Prediction, _base

__all__ = ["TemperatureScaling", "VectorScaling", "VarianceScaling"]


def _class_logits(pred) -> tuple[torch.Tensor, bool]:
    """Per-draw normalised logits (log-probabilities) ``[S, N, C]`` (float64), and whether binary.

    Normalising (``log_softmax``) makes raw logits and Predictions give the same
    calibrator. A Bernoulli logit ``f`` becomes the two columns ``log_softmax([0, f])``.
    Accepts a Prediction or a raw logit array ``[N, C]`` / ``[S, N, C]``.
    """
    if isinstance(pred, Prediction):
        if not pred.is_classification:
            raise ValueError("this calibrator needs a classification Prediction; for regression use VarianceScaling")
        d = _base(pred.conditional)[0]
        if isinstance(d, dist.Bernoulli):
            f = d.logits.detach().double()
            return torch.log_softmax(torch.stack([torch.zeros_like(f), f], -1), -1), True
        if isinstance(d, dist.Categorical):
            return torch.log_softmax(d.logits.detach().double(), -1), False
        raise ValueError(f"cannot calibrate a {type(d).__name__} predictive; use Categorical or Bernoulli")
    f = torch.as_tensor(pred).detach().double()
    if f.dim() == 2:
        f = f[None]
    if f.dim() != 3 or f.shape[-1] < 2:
        raise ValueError(f"logits must have shape [N, C] or [draws, N, C] with C >= 2, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError("logits contain NaN or inf")
    return torch.log_softmax(f, -1), False


def _mixture_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over points of ``-log (1/S) sum_s softmax(logits_s)[y]``."""
    lp = torch.log_softmax(logits, -1).gather(-1, y.expand(logits.shape[0], -1)[..., None])[..., 0]
    return -(torch.logsumexp(lp, 0) - math.log(logits.shape[0])).mean()


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> None:
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    for p in params:
        if not torch.isfinite(p).all():
            raise ValueError("calibration diverged (non-finite parameters); check the validation predictions")


def _classification_prediction(pred: Prediction, logits: torch.Tensor, binary: bool) -> Prediction:
    """A Prediction with new per-draw logits ``[S, N, C]``; samples hold the new logits too."""
    logits = logits.to(pred.samples.dtype)
    if binary:
        f = logits[..., 1] - logits[..., 0]
        return Prediction(f[..., None], dist.Bernoulli(logits=f))
    return Prediction(logits, dist.Categorical(logits=logits))


def _probs_like(raw, logits: torch.Tensor) -> torch.Tensor:
    """Mixture probabilities ``[N, C]`` in the dtype of the raw logits the user passed."""
    raw = torch.as_tensor(raw)
    p = torch.softmax(logits, -1).mean(0)
    return p.to(raw.dtype) if raw.is_floating_point() else p


class _Calibrator:
    fields: tuple[str, ...] = ()  # the fitted parameters, None before fit

    def __init__(self) -> None:
        for name in self.fields:
            setattr(self, name, None)

    @property
    def fitted(self) -> bool:
        return getattr(self, self.fields[0]) is not None

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} is not fitted; call .fit(validation_prediction, labels) first")

    def __call__(self, pred: Prediction) -> Prediction:
        return self.apply(pred)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)}' for k in self.fields)})"


class TemperatureScaling(_Calibrator):
    """One temperature ``T`` for all classes: per-draw probabilities ``softmax(f / T)``.

    ``fit`` minimises the validation NLL of the posterior-predictive mixture over ``log T``
    with L-BFGS. Temperature scaling never changes a draw's top class, so accuracy is
    unchanged for a single draw (and almost unchanged for a mixture).

    Attributes:
        temperature: the fitted ``T`` (None before ``fit``).

    Example:
        >>> import torch, pbnn
        >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0]])
        >>> y = torch.tensor([0, 1, 1, 1])   # 3 of 4 right at confidence 0.98
        >>> ts = pbnn.calibration.TemperatureScaling().fit(logits, y)
        >>> round(ts.apply(logits).max(-1).values.mean().item(), 3)   # softened to the accuracy
        0.75
    """

    fields = ("temperature",)

    def fit(self, pred, y, max_iter: int = 100) -> TemperatureScaling:
        """Fit ``T`` on validation predictions (Prediction or logits ``[N, C]`` / ``[S, N, C]``) and labels."""
        logits, _ = _class_logits(pred)
        y = _labels(y, logits.shape[1], logits.shape[2]).to(logits.device)
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        _lbfgs([log_t], lambda: _mixture_nll(logits / log_t.exp(), y), max_iter)
        self.temperature = float(log_t.detach().exp())
        return self

    def apply(self, pred):
        """Rescale a Prediction (returns a new one) or raw logits (returns probabilities)."""
        self._check_fitted()
        logits, binary = _class_logits(pred)
        if not isinstance(pred, Prediction):
            return _probs_like(pred, logits / self.temperature)
        return _classification_prediction(pred, logits / self.temperature, binary)


class VectorScaling(_Calibrator):
    """A scale and a bias per class: per-draw probabilities ``softmax(w * f + b)``.

    ``f`` are the normalised logits (log-probabilities ``log_softmax(logits)``), so raw
    logits and Predictions give the same calibrator.

    More flexible than temperature scaling (it can move the decision boundary, so it can
    change accuracy) and needs more validation data (``2 C`` parameters).

    Attributes:
        weight, bias: fitted tensors ``[C]`` (None before ``fit``).

    Example:
        >>> import torch, pbnn
        >>> logits = torch.zeros(4, 2)   # an uninformative model ...
        >>> vs = pbnn.calibration.VectorScaling().fit(logits, torch.tensor([1, 1, 1, 0]))
        >>> vs.apply(logits)[0]   # ... learns the class frequencies through the bias
        tensor([0.2500, 0.7500])
    """

    fields = ("weight", "bias")

    def fit(self, pred, y, max_iter: int = 200) -> VectorScaling:
        """Fit ``w, b`` on validation predictions (Prediction or logits) and labels."""
        logits, _ = _class_logits(pred)
        num_classes = logits.shape[2]
        y = _labels(y, logits.shape[1], num_classes).to(logits.device)
        log_w = torch.zeros(num_classes, dtype=torch.float64, device=logits.device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, device=logits.device, requires_grad=True)
        _lbfgs([log_w, b], lambda: _mixture_nll(logits * log_w.exp() + b, y), max_iter)
        self.weight, self.bias = log_w.detach().exp(), b.detach() - b.detach().mean()  # b is shift-invariant
        return self

    def apply(self, pred):
        """Rescale a Prediction (returns a new one) or raw logits (returns probabilities)."""
        self._check_fitted()
        logits, binary = _class_logits(pred)
        if logits.shape[-1] != len(self.weight):
            raise ValueError(f"fitted for {len(self.weight)} classes, got {logits.shape[-1]}")
        new = logits * self.weight + self.bias
        if not isinstance(pred, Prediction):
            return _probs_like(pred, new)
        return _classification_prediction(pred, new, binary)


_LOC_SCALE = (dist.Normal, dist.StudentT, dist.Laplace, dist.Cauchy)


class VarianceScaling(_Calibrator):
    """Regression: scale the whole predictive about its mean by a factor ``s``.

    Each draw's location-scale conditional ``(mu_s, sigma_s)`` becomes
    ``(m + s (mu_s - m), s sigma_s)`` with ``m`` the mean of ``mu_s`` over draws, so the
    mixture's mean is kept and its standard deviation (aleatoric and epistemic parts
    alike) is multiplied by ``s``. ``s`` minimises the validation NLL. Needs a Normal,
    StudentT, Laplace or Cauchy predictive.

    Attributes:
        scale: the fitted factor ``s`` (None before ``fit``); ``s > 1`` means the model was
            overconfident.

    Example:
        >>> import torch, pbnn
        >>> from pyro.distributions import Normal
        >>> y = torch.randn(4000, generator=torch.Generator().manual_seed(0))
        >>> pred = pbnn.Prediction(torch.zeros(1, 4000, 1), Normal(torch.zeros(1, 4000), 0.5))   # too narrow
        >>> vs = pbnn.calibration.VarianceScaling().fit(pred, y)
        >>> round(vs.scale, 1), round(float(vs(pred).stddev.mean()), 1)
        (2.0, 1.0)
    """

    fields = ("scale",)

    @staticmethod
    def _parts(pred: Prediction) -> tuple[dist.Distribution, int, torch.Tensor]:
        pred = _regression(pred, "VarianceScaling")
        d, ndims = _base(pred.conditional)
        if not isinstance(d, _LOC_SCALE):
            raise ValueError(f"VarianceScaling needs a location-scale predictive (Normal, ...), got {type(d).__name__}")
        return d, ndims, d.loc.mean(0)

    def fit(self, pred: Prediction, y, max_iter: int = 100) -> VarianceScaling:
        """Fit ``s`` on a validation Prediction and its targets."""
        d, _, centre = self._parts(pred)
        y = _targets(pred, y)
        centre, y = centre.detach().double(), y.detach().double()
        d64 = type(d)(**{k: getattr(d, k).detach().double() for k in ("df", "loc", "scale") if hasattr(d, k)})
        per_point_dims = y[0].numel()  # the Jacobian of y -> m + (y - m) / s is s^-D per point

        def loss():
            s = log_s.exp()
            yy = (centre + (y - centre) / s).reshape(centre.shape)
            lp = d64.log_prob(yy.expand_as(d64.loc))
            lp = lp.reshape(lp.shape[:2] + (-1,)).sum(-1)  # sum over outputs: [S, N]
            mix = torch.logsumexp(lp, 0) - math.log(lp.shape[0])
            return -(mix.mean() - per_point_dims * log_s)

        log_s = torch.zeros((), dtype=torch.float64, device=y.device, requires_grad=True)
        _lbfgs([log_s], loss, max_iter)
        self.scale = float(log_s.detach().exp())
        return self

    def apply(self, pred: Prediction) -> Prediction:
        """A new Prediction whose predictive is scaled by ``s`` about its mean (samples are kept)."""
        self._check_fitted()
        d, ndims, centre = self._parts(pred)
        params = {k: getattr(d, k) for k in ("df", "loc", "scale") if hasattr(d, k)}
        params["loc"] = centre + self.scale * (d.loc - centre)
        params["scale"] = self.scale * d.scale
        new = type(d)(**params)
        return Prediction(pred.samples, new.to_event(ndims) if ndims else new)
