"""Hand-written Pyro models go through the same fit / Posterior / predictive path."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn


def hierarchical_model(x, y=None, subsample=None):
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(0.0, tau).expand([2]).to_event(1))
    offset = pyro.param("offset", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(x[i] @ w + offset, 0.2), obs=None if y is None else y[i])


def full_batch_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, 0.2), obs=y)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    return x, x @ torch.tensor([1.0, -2.0]) + 0.5 + 0.2 * torch.randn(60, generator=g)


def test_svi_on_a_hand_written_model(data):
    x, y = data
    post = pbnn.fit(
        hierarchical_model, x, y, method="svi", num_steps=1500, lr=0.02, num_samples=200, seed=0, progress=False
    )
    assert set(post.samples) == {"tau", "w"}
    assert post.fixed["offset"].item() == pytest.approx(0.5, abs=0.1)
    assert torch.allclose(post.samples["w"].mean((0, 1)), torch.tensor([1.0, -2.0]), atol=0.1)
    pred = post.predict(x[:5], num_samples=50)
    assert pred.mean.shape == (5,)
    assert torch.allclose(pred.mean, x[:5] @ torch.tensor([1.0, -2.0]) + 0.5, atol=0.4)
    idata = post.to_arviz()
    assert idata.log_likelihood["obs"].shape == (4, 50, 60)  # 200 independent draws: 4 chains of 50


def test_minibatch_needs_subsample_argument(data):
    x, y = data
    with pytest.raises(ValueError, match="subsample"):
        pbnn.fit(full_batch_model, x, y, method="svi", batch_size=10, num_steps=5, progress=False)
    post = pbnn.fit(full_batch_model, x, y, method="map", num_steps=500, lr=0.05, seed=0, progress=False)
    assert post.samples["w"].shape == (1, 1, 2)
