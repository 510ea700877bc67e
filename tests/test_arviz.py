import warnings

import numpy as np
import pytest
import torch

import pbnn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


@pytest.fixture(scope="module")
def post():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(25, 1)
    y = torch.sin(x[:, 0])
    return pbnn.fit(pbnn.BNN(net), x, y, method="svi", num_steps=200, num_samples=100, seed=0, progress=False)


def test_groups_and_shapes(post):
    idata = post.to_arviz()
    for group in ("posterior", "log_likelihood", "observed_data"):
        assert group in idata.groups()
    assert idata.posterior["0.weight"].shape == (1, 100, 4, 1)
    assert idata.posterior["sigma"].shape == (1, 100)
    assert idata.log_likelihood["obs"].shape == (1, 100, 25)
    np.testing.assert_allclose(idata.observed_data["obs"].values, post.data.y.numpy())


def test_log_likelihood_group_is_the_pointwise_log_density(post):
    idata = post.to_arviz()
    flat = post.flat_samples()
    s = 17
    ll = post.model.log_likelihood({k: v[s] for k, v in flat.items()}, post.data.x, post.data.y)
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0, s], ll.numpy(), rtol=1e-5, atol=1e-5)


def test_summary_and_loo_run(post):
    idata = post.to_arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, var_names=["sigma"])
        loo = az.loo(idata)
    assert "r_hat" in summary.columns
    assert np.isfinite(loo.elpd_loo)


def test_sample_stats_group():
    x = torch.randn(10, 1)
    post = pbnn.Posterior(
        pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(1.0)),
        {"weight": torch.zeros(2, 3, 1, 1), "bias": torch.zeros(2, 3, 1)},
        data=pbnn.data.Data(x, torch.zeros(10)),
        method="test",
        sample_stats={"diverging": torch.zeros(2, 3, dtype=torch.bool)},
    )
    idata = post.to_arviz()
    assert idata.sample_stats["diverging"].shape == (2, 3)
