"""Small generated data sets (no downloads), shared by the demo, tests and benchmarks.

Example:
    >>> from pbnn.core.datasets import gap_regression
    >>> d = gap_regression(seed=0)
    >>> d["x_train"].shape, d["x_test"].shape
    (torch.Size([160, 1]), torch.Size([200, 1]))
"""

from __future__ import annotations

import torch

__all__ = ["gap_regression"]


def gap_regression(n_train: int = 160, n_test: int = 200, noise: float = 0.1, gap: float = 0.8, seed: int = 0) -> dict:
    """1-D regression ``y = sin(3x) + noise`` with no training inputs in ``(-gap, gap)``.

    Training inputs cover ``[-2, -gap] U [gap, 2]``; test inputs are spread evenly over
    ``[-2, 2]``, gap included. The function turns inside the gap, so the data do not pin
    it down there: a good posterior widens its bands in the gap ("in-between"
    uncertainty), a point estimate does not. Inputs and targets are roughly standardised.
    """
    g = torch.Generator().manual_seed(seed)
    half = n_train // 2
    left = -2 + (2 - gap) * torch.rand(half, generator=g)
    right = gap + (2 - gap) * torch.rand(n_train - half, generator=g)
    x_train = torch.cat([left, right])[:, None]
    x_test = torch.linspace(-2, 2, n_test)[:, None]

    def f(x):
        return torch.sin(3 * x[:, 0])

    y_train = f(x_train) + noise * torch.randn(n_train, generator=g)
    y_test = f(x_test) + noise * torch.randn(n_test, generator=g)
    in_gap = x_test[:, 0].abs() < gap
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "in_gap": in_gap}
