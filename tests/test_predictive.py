import math
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


# ----------------------------------------------------------------------------- bad targets (issue 27)
def _categorical(n=5, c=3):
    logits = torch.randn(4, n, c, generator=torch.Generator().manual_seed(0))
    return pbnn.Prediction(logits, dist.Categorical(logits=logits))


@pytest.mark.parametrize(
    "y, match",
    [
        (torch.tensor([2.9, 0.0, 1.0, 1.0, 0.0]), r"whole numbers.*2\.9.*point 0"),  # was scored as class 2
        (torch.tensor([1.0, -0.5, 1.0, 1.0, 0.0]), r"whole numbers.*-0\.5.*point 1"),  # was scored as class 0
        (torch.tensor([0, 1, 3, 1, 0]), r"\[0, 3\) for 3 classes.*\[0, 3\]"),
        (torch.tensor([0, -1, 2, 1, 0]), r"\[0, 3\) for 3 classes.*\[-1, 2\]"),
        (torch.tensor([[0], [1], [2], [1], [0]]), r"shape \[5\].*\(5, 1\).*y\[:, 0\]"),  # was an [N, N] table
        (torch.tensor([1]), r"shape \[5\].*\(1,\)"),
        (torch.tensor([0, 1, 2, 1]), r"shape \[5\].*\(4,\)"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0, 0.0]), "whole numbers"),
    ],
)
def test_log_prob_refuses_bad_class_labels(y, match):
    pred = _categorical()
    with pytest.raises(ValueError, match=match):
        pred.log_prob(y)
    with pytest.raises(ValueError, match=match):
        pred.pointwise_log_likelihood(y)


def test_log_prob_accepts_whole_float_labels_and_bernoulli_checks():
    pred = _categorical()
    y = torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(pred.log_prob(y.double()), pred.log_prob(y))
    logits = torch.zeros(2, 3)
    bern = pbnn.Prediction(logits[..., None], dist.Bernoulli(logits=logits))
    assert torch.allclose(bern.log_prob(torch.tensor([0, 1, 1])), torch.full((3,), -math.log(2)))
    with pytest.raises(ValueError, match=r"\[0, 2\) for 2 classes"):
        bern.log_prob(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="whole numbers"):
        bern.log_prob(torch.tensor([0.0, 0.5, 1.0]))


def test_log_prob_refuses_regression_targets_of_the_wrong_length():
    pred = pbnn.Prediction(torch.zeros(2, 5, 1), dist.Normal(torch.zeros(2, 5), 1.0))
    for y in (torch.zeros(1), torch.zeros(4), torch.zeros(5, 2), torch.zeros(1, 5)):
        with pytest.raises(ValueError, match=r"shape \[5\] to match the 5 predicted point"):
            pred.log_prob(y)
    # the documented forms still score: [N] and, for one output, [N, 1]
    assert torch.equal(pred.log_prob(torch.zeros(5, 1)), pred.log_prob(torch.zeros(5)))
    assert torch.allclose(pred.log_prob([0.0] * 5), torch.full((5,), -0.5 * math.log(2 * math.pi)))


@pytest.mark.parametrize("prob, match", [(0, "strictly in"), (1.0, "strictly in"), (90, "pass 0.9"), ("x", "a number")])
def test_interval_and_quantile_refuse_bad_probabilities(prob, match):
    pred = pbnn.Prediction(torch.zeros(2, 5, 1), dist.Normal(torch.zeros(2, 5), 1.0))
    with pytest.raises(ValueError, match=match):
        pred.interval(prob)
    with pytest.raises(ValueError, match=match.replace("pass 0.9", "strictly")):
        pred.quantile(prob)
    with pytest.raises(ValueError, match="strictly in"):
        _categorical().interval(float("nan"))


def test_predict_checks_inputs_against_the_training_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(12, 2)
    post = pbnn.fit(pbnn.BNN(net), x, x[:, 0], method="map", num_steps=5, progress=False, seed=0)
    with pytest.raises(ValueError, match=r"x has shape \(6, 3\).*fitted on inputs of shape \(12, 2\).*same 2 feature"):
        post.predict(torch.randn(6, 3))  # was a raw bmm RuntimeError
    with pytest.raises(ValueError, match=r"x has shape \(6,\)"):
        post.predict(torch.randn(6))
    with pytest.raises(ValueError, match="NaN or inf"):
        post.predict(torch.full((3, 2), float("nan")))
    assert post.predict(torch.randn(6, 2)).mean.shape == (6,)
    one = pbnn.fit(pbnn.BNN(torch.nn.Linear(1, 1)), x[:, :1], x[:, 0], method="map", num_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"pass x\[:, None\] \(shape \[6, 1\]\)"):
        one.predict(torch.randn(6))
