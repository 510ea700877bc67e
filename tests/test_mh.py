"""Random-walk Metropolis-Hastings: acceptance statistics and a conjugate check."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.posterior.diagnostics import ess_bulk


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_conjugate_and_acceptance(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1), pbnn.priors.Normal(0.0, c["alpha"]), pbnn.likelihoods.Gaussian(c["sigma"]))
    opts = dict(num_samples=500, warmup=1000, thinning=4, init="net", seed=0, progress=False)
    post = pbnn.fit(model, c["x"], c["y"], method="mh", **opts)
    acc = post.sample_stats["acceptance_rate"]
    assert acc.shape == (4, 500)
    # Adapted towards 0.234; in 3 dimensions the optimum is higher, so allow a wide band.
    assert 0.1 < float(acc.mean()) < 0.6
    assert "acceptance_rate" in post.to_arviz().sample_stats
    w, b = post.samples["weight"], post.samples["bias"]
    theta = torch.cat([w.reshape(4, 500, 2), b.reshape(4, 500, 1)], -1).double()
    sd = c["cov"].diag().double().sqrt()
    ess = ess_bulk(theta)
    assert (ess > 100).all()
    # Mean within 4.5 Monte Carlo standard errors (from the ESS); variance within 30%
    # (loose: random-walk variance estimates converge slowly, but a wrong scale or a
    # missing likelihood term is off by far more).
    err = (theta.reshape(-1, 3).mean(0) - c["mean"].double()).abs()
    assert (err < 4.5 * sd / ess.sqrt()).all(), (err, sd / ess.sqrt())
    ratio = theta.reshape(-1, 3).var(0) / c["cov"].diag().double()
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio


def test_pyro_model_through_random_walk_kernel(conjugate):
    c = conjugate

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, c["alpha"]).expand([2]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, c["alpha"]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w + b, c["sigma"]), obs=y)

    post = pbnn.fit(model, c["x"], c["y"], method="mh", num_samples=100, warmup=300, num_chains=1, thinning=2,
                    seed=0, progress=False, warn=False)  # fmt: skip
    assert post.samples["w"].shape == (1, 100, 2)
    acc = post.sample_stats["acceptance_rate"]
    assert acc.shape == (1, 100) and 0 < float(acc.mean()) < 1


def test_mh_is_full_batch():
    with pytest.raises(ValueError, match="sgld"):
        pbnn.infer.MH(batch_size=32)
