"""Calibration plots (reliability diagrams, regression calibration curves) as matplotlib Figures
built without pyplot, saved as PNG when given ``path``.

Example:
    >>> import torch, pbnn, pbnn.plots
    >>> p = torch.softmax(torch.randn(200, 3), -1); y = torch.multinomial(p, 1)[:, 0]
    >>> fig = pbnn.plots.reliability_diagram(p, y)
    >>> fig.axes[1].get_xlabel()
    'confidence'
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pbnn.evaluation import metrics

__all__ = ["reliability_diagram", "calibration_curve"]


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def reliability_diagram(
    pred, y, num_bins: int = 15, adaptive: bool = False, title: str | None = None, path: str | Path | None = None
) -> Figure:
    """Reliability diagram: accuracy against top-label confidence per bin, with the ECE.

    Bars show each bin's accuracy, red hatching the gap to its mean confidence, and the
    lower panel the number of points per bin. A calibrated model's bars follow the
    diagonal; bars below it mean overconfidence.

    Args:
        pred: classification :class:`pbnn.Prediction` or probabilities ``[N, C]``.
        y: labels ``[N]``.
        num_bins: number of bins; ``adaptive=True`` uses equal-mass bins.
        title: axes title (default: ``"ECE = ..."``).
        path: save the figure as a PNG here.

    Example:
        >>> import pbnn.evaluation.plots
        >>> fig = pbnn.plots.reliability_diagram([[0.9, 0.1]] * 4, [0, 0, 0, 1], num_bins=5)
        >>> round(float(fig.axes[0].patches[0].get_height()), 2)   # accuracy in the 0.8-1 bin
        0.75
    """
    b = metrics.calibration_bins(pred, y, num_bins, adaptive)
    err = metrics.ece(pred, y, num_bins, adaptive)
    keep = b["count"] > 0
    # equal-mass bins have uneven edges: draw them at their mean confidence with a common width
    centre = (b["confidence"] if adaptive else (b["lower"] + b["upper"]) / 2)[keep]
    width = (np.full(num_bins, 1.0 / num_bins) if adaptive else b["upper"] - b["lower"])[keep]
    fig = Figure(figsize=(4.2, 5.0))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centre, b["accuracy"][keep], width=width * 0.95, color="C0", edgecolor="k", lw=0.5, label="accuracy")
    gap = b["confidence"][keep] - b["accuracy"][keep]
    ax.bar(
        centre,
        gap,
        bottom=b["accuracy"][keep],
        width=width * 0.95,
        color="C3",
        alpha=0.3,
        hatch="//",
        edgecolor="C3",
        lw=0.5,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title or f"ECE = {err:.3f}")
    ax.legend(loc="upper left", fontsize=7)
    hist.bar(centre, b["count"][keep], width=width * 0.95, color="grey")
    hist.set(xlabel="confidence", ylabel="count", xlim=(0, 1))
    return _finish(fig, path)


def calibration_curve(
    pred, y, num_levels: int = 19, title: str | None = None, path: str | Path | None = None
) -> Figure:
    """Regression calibration curve: observed vs expected frequency of ``PIT <= p``, and a PIT histogram.

    A calibrated predictive follows the diagonal and has a flat PIT histogram; an
    overconfident (under-dispersed) one gives an S-shaped curve and a U-shaped histogram.

    Args:
        pred: regression :class:`pbnn.Prediction`; ``y``: targets.
        num_levels: levels ``p`` evenly spaced in (0, 1).
        title: axes title (default: the mean absolute calibration error).
        path: save the figure as a PNG here.

    Example:
        >>> import torch, pbnn, pbnn.plots
        >>> from pyro.distributions import Normal
        >>> pred = pbnn.Prediction(torch.zeros(1, 100, 1), Normal(torch.zeros(1, 100), 1.0))
        >>> fig = pbnn.plots.calibration_curve(pred, torch.randn(100))
        >>> len(fig.axes)
        2
    """
    expected, observed = metrics.pit_calibration_curve(pred, y, num_levels)
    err = float(np.abs(observed - expected).mean())
    u = metrics.pit(pred, y).reshape(-1).double().cpu().numpy()
    fig = Figure(figsize=(8.0, 3.6))
    ax, hist = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(expected, observed, "o-", color="C0", label="model")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="expected fraction below the p-quantile",
        ylabel="observed fraction",
        title=title or f"calibration error = {err:.3f}",
    )
    ax.legend(loc="upper left", fontsize=7)
    hist.hist(u, bins=10, range=(0, 1), color="grey", edgecolor="k", lw=0.5)
    hist.axhline(len(u) / 10, color="k", ls="--", lw=1)
    hist.set(xlabel="PIT value", ylabel="count", title="PIT histogram (flat = calibrated)")
    return _finish(fig, path)
