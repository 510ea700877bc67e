import pytest
import torch


@pytest.fixture
def conjugate():
    """Bayesian linear regression y = x w + b + N(0, sigma^2), prior N(0, alpha^2) on (w, b).

    Returns the data and the exact posterior over theta = (w_1, ..., w_d, b):
    precision L = Phi^T Phi / sigma^2 + I / alpha^2, mean = L^-1 Phi^T y / sigma^2.
    """
    g = torch.Generator().manual_seed(0)
    n, d, sigma, alpha = 50, 2, 0.5, 1.0
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.5, -0.7]) + 0.3 + sigma * torch.randn(n, generator=g)
    phi = torch.cat([x, torch.ones(n, 1)], 1).double()
    prec = phi.T @ phi / sigma**2 + torch.eye(d + 1, dtype=torch.double) / alpha**2
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y.double() / sigma**2
    return {
        "x": x,
        "y": y,
        "sigma": sigma,
        "alpha": alpha,
        "mean": mean.float(),
        "cov": cov.float(),
        "prec": prec.float(),
    }


@pytest.fixture
def make_net():
    """Factory for small tanh MLPs with a fixed initialisation."""

    def make(inp=1, hidden=8, out=1, seed=0):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(inp, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out))

    return make
