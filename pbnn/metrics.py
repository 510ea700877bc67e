"""Metrics on a :class:`pbnn.Prediction` and the true targets.

Example:
    >>> import torch, pbnn
    >>> from pyro.distributions import Normal
    >>> pred = pbnn.Prediction(torch.zeros(2, 3, 1), Normal(torch.zeros(2, 3), 1.0))
    >>> round(pbnn.metrics.nll(pred, torch.zeros(3)), 4)   # -log N(0 | 0, 1)
    0.9189
"""

from __future__ import annotations

import torch

from pbnn.predictive import Prediction

__all__ = ["rmse", "nll", "coverage"]


def rmse(pred: Prediction, y: torch.Tensor) -> float:
    """Root mean squared error of the predictive mean."""
    y = torch.as_tensor(y, dtype=pred.mean.dtype).reshape(pred.mean.shape)
    return float((pred.mean - y).pow(2).mean().sqrt())


def nll(pred: Prediction, y: torch.Tensor) -> float:
    """Mean over test points of the negative log predictive density (mixture over draws)."""
    return float(-pred.log_prob(y).mean())


def coverage(pred: Prediction, y: torch.Tensor, prob: float = 0.9) -> float:
    """Fraction of targets inside the central ``prob`` predictive interval."""
    lo, hi = pred.interval(prob)
    y = torch.as_tensor(y, dtype=lo.dtype).reshape(lo.shape)
    return float(((y >= lo) & (y <= hi)).float().mean())
