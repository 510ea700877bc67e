"""Calibration plots draw what the metrics compute, and save PNGs."""

import numpy as np
import pbnn.plots
import torch
from pyro.distributions import Normal

import pbnn


def test_reliability_diagram_bars_are_bin_accuracies(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(500, 3, generator=g), -1)
    y = torch.multinomial(torch.softmax(torch.log(p) / 3, -1), 1, generator=g)[:, 0]  # overconfident model
    fig = pbnn.plots.reliability_diagram(p, y, num_bins=10, path=tmp_path / "rel.png")
    bins = pbnn.metrics.calibration_bins(p, y, 10)
    keep = bins["count"] > 0
    heights = [b.get_height() for b in fig.axes[0].patches[: keep.sum()]]
    np.testing.assert_allclose(heights, bins["accuracy"][keep])
    assert f"{pbnn.metrics.ece(p, y, 10):.3f}" in fig.axes[0].get_title()
    assert (tmp_path / "rel.png").stat().st_size > 10_000
    fig = pbnn.plots.reliability_diagram(p, y, adaptive=True)  # equal-mass bins draw too
    assert len(fig.axes) == 2


def test_regression_calibration_curve(tmp_path):
    n = 400
    pred = pbnn.Prediction(torch.zeros(1, n, 1), Normal(torch.zeros(1, n), 0.5))
    y = torch.randn(n, generator=torch.Generator().manual_seed(0))
    fig = pbnn.plots.calibration_curve(pred, y, path=tmp_path / "cal.png")
    expected, observed = pbnn.metrics.pit_calibration_curve(pred, y)
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), observed)
    assert (tmp_path / "cal.png").stat().st_size > 10_000
