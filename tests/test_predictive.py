import resource

import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.posterior.predictive import predict_bnn


def _posterior(make_net, draws=30, lik=None, out=1):
    model = pbnn.BNN(make_net(out=out), likelihood=lik or pbnn.likelihoods.Gaussian("learned"))
    x = torch.randn(20, 1)
    y = torch.randn(20) if out == 1 or lik is None else torch.randint(0, out, (20,))
    post = pbnn.fit(model, x, y, method="svi", num_steps=50, num_samples=draws, seed=0, progress=False)
    return post, x, y


def test_vectorised_predictive_agrees_with_a_loop_over_draws(make_net):
    post, x, y = _posterior(make_net)
    pred = post.predict(x)
    flat = post.flat_samples()
    loop_f, loop_lp = [], []
    for s in range(flat["sigma"].shape[0]):
        params = {n: flat[n][s] for n in post.model.bayesian_names}
        f = _with_params(post.model.net, params)(x)
        loop_f.append(f)
        loop_lp.append(torch.distributions.Normal(f[:, 0], flat["sigma"][s]).log_prob(y))
    assert torch.allclose(pred.samples, torch.stack(loop_f), atol=1e-5)
    lp = torch.stack(loop_lp)
    assert torch.allclose(pred.log_prob(y), torch.logsumexp(lp, 0) - torch.log(torch.tensor(len(lp))), atol=1e-5)
    assert torch.allclose(pred.mean, torch.stack(loop_f)[..., 0].mean(0), atol=1e-5)
    total = torch.stack(loop_f)[..., 0].var(0, unbiased=False) + (flat["sigma"] ** 2).mean()
    assert torch.allclose(pred.variance, total, atol=1e-5)


def _with_params(net, params):
    import copy

    net = copy.deepcopy(net)
    for name, value in params.items():
        mod_name, _, attr = name.rpartition(".")
        setattr(net.get_submodule(mod_name), attr, torch.nn.Parameter(value))
    return net


def test_chunking_does_not_change_results_and_bounds_memory(make_net):
    post, x, _ = _posterior(make_net, draws=7)
    draws = post.flat_samples()
    a = predict_bnn(post.model, draws, post.fixed, x, chunk_size=2).samples
    b = predict_bnn(post.model, draws, post.fixed, x, chunk_size=100).samples
    assert torch.equal(a, b)
    # 2000 draws of a 1000-unit hidden layer at 1000 points: unchunked activations would be
    # 2000 * 1000 * 1000 * 4 B = 8 GB; chunked, peak memory grows by well under 1 GB.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    many = {n: p.detach().expand((2000,) + p.shape) for n, p in model.net.named_parameters()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pred = predict_bnn(model, many, {}, torch.randn(1000, 1))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert pred.samples.shape == (2000, 1000, 1)
    assert grown_mb < 1000


def test_interval_and_quantile_match_a_gaussian_closed_form():
    loc, scale = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]])
    pred = pbnn.Prediction(loc[..., None], dist.Normal(loc, scale))
    lo, hi = pred.interval(0.9)
    z = 1.6448536
    assert torch.allclose(hi, torch.tensor([z, 1 + 2 * z]), atol=1e-4)
    assert torch.allclose(lo, torch.tensor([-z, 1 - 2 * z]), atol=1e-4)
    # A two-component mixture: the quantile solves the mixture CDF equation.
    locs = torch.tensor([[-2.0], [2.0]])
    mix = pbnn.Prediction(locs[..., None], dist.Normal(locs, 1.0))
    q = mix.quantile(0.3)
    assert mix.cdf(q).item() == pytest.approx(0.3, abs=1e-5)


def test_classification_prediction(make_net):
    post, x, y = _posterior(make_net, lik=pbnn.likelihoods.Categorical(), out=3)
    pred = post.predict(x)
    assert pred.is_classification and pred.probs.shape == (20, 3)
    assert torch.allclose(pred.probs.sum(-1), torch.ones(20), atol=1e-5)
    assert torch.all(pred.mutual_information <= pred.entropy + 1e-6)
    assert torch.allclose(pred.variance, pred.probs * (1 - pred.probs), atol=1e-5)
    lo, hi = pred.interval(0.9)
    assert torch.all(lo <= pred.probs + 1e-6) and torch.all(hi >= pred.probs - 1e-6)


def test_predict_with_more_draws_uses_the_fitted_distribution(make_net):
    post, x, _ = _posterior(make_net, draws=10)
    assert post.predict(x, num_samples=5).num_draws == 5
    assert post.predict(x, num_samples=50).num_draws == 50
    a = post.predict(x, num_samples=50, seed=3).samples
    assert torch.equal(a, post.predict(x, num_samples=50, seed=3).samples)
