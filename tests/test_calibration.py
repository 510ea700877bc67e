"""Post-hoc recalibration: known temperatures / scales are recovered, NLL and ECE go down."""

import math

import numpy as np
import pytest
import torch
from pbnn.calibration import TemperatureScaling, VarianceScaling, VectorScaling
from pyro.distributions import Bernoulli, Categorical, Normal
from scipy import optimize, stats
from scipy.special import log_softmax, logsumexp

import pbnn
from pbnn import metrics


def synthetic(n, c=4, t_star=3.0, seed=0):
    """True logits z, labels y ~ softmax(z); the model reports t_star * z (overconfident)."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g)[:, 0]
    f = t_star * z
    return f, y, pbnn.Prediction(f[None], Categorical(logits=f[None]))


def mixture_nll_np(logits, y, t):
    """numpy: -mean_i log (1/S) sum_s softmax(logits_s / t)[y_i]."""
    lp = log_softmax(logits / t, -1)[:, np.arange(len(y)), y]
    return -(logsumexp(lp, 0) - np.log(logits.shape[0])).mean()


def test_temperature_recovers_known_temperature_and_cuts_ece():
    f, y, pred = synthetic(6000)
    ts = TemperatureScaling().fit(pred, y)
    # standard error of the MLE of T from the observed Fisher information (numerical 2nd derivative)
    fl, yl, n = f.numpy()[None], y.numpy(), len(y)
    h = 1e-3
    t = ts.temperature
    curv = n * (mixture_nll_np(fl, yl, t + h) - 2 * mixture_nll_np(fl, yl, t) + mixture_nll_np(fl, yl, t - h)) / h**2
    se = 1 / math.sqrt(curv)
    assert abs(t - 3.0) < 4 * se
    assert se < 0.1  # informative enough for the check to bite
    cal = ts(pred)
    assert metrics.ece(pred, y) > 0.1
    assert metrics.ece(cal, y) < metrics.ece(pred, y) / 2
    assert metrics.nll(cal, y) < metrics.nll(pred, y)
    assert metrics.accuracy(cal, y) == metrics.accuracy(pred, y)  # T never changes the top class
    # the applied prediction is softmax(f / T) and the input was not modified
    np.testing.assert_allclose(cal.probs.numpy(), torch.softmax(f / t, -1).numpy(), rtol=1e-10)
    assert torch.equal(pred.samples[0], f)


def test_temperature_is_the_minimiser_with_posterior_draws():
    """With S draws the fitted T minimises the mixture NLL (checked by scipy on a numpy objective)."""
    g = torch.Generator().manual_seed(3)
    logits = 2.5 * torch.randn(8, 400, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (400,), generator=g)
    pred = pbnn.Prediction(logits, Categorical(logits=logits))
    ts = TemperatureScaling().fit(pred, y)
    res = optimize.minimize_scalar(
        lambda lt: mixture_nll_np(logits.numpy(), y.numpy(), math.exp(lt)), bounds=(-3, 5), method="bounded"
    )
    assert ts.temperature == pytest.approx(math.exp(res.x), rel=1e-4)
    expected = torch.softmax(logits / ts.temperature, -1).mean(0)
    np.testing.assert_allclose(ts(pred).probs.numpy(), expected.numpy(), rtol=1e-10)
    # raw logits: same fit, apply returns probabilities
    ts2 = TemperatureScaling().fit(logits, y)
    assert ts2.temperature == pytest.approx(ts.temperature, rel=1e-8)
    np.testing.assert_allclose(ts2.apply(logits).numpy(), expected.numpy(), rtol=1e-10)


def test_temperature_bernoulli():
    g = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(5000, generator=g)
    y = torch.bernoulli(torch.sigmoid(z), generator=g)
    f = (0.5 * z)[None, :, None]  # underconfident: true T = 0.5
    pred = pbnn.Prediction(f, Bernoulli(logits=f[..., 0]))
    ts = TemperatureScaling().fit(pred, y)
    assert ts.temperature == pytest.approx(0.5, abs=0.05)  # SE ~ 0.01 at n = 5000
    cal = ts(pred)
    assert isinstance(cal.conditional, Bernoulli)
    np.testing.assert_allclose(cal.probs.numpy(), torch.sigmoid(f[0, :, 0] / ts.temperature).numpy(), rtol=1e-5)
    assert metrics.nll(cal, y) < metrics.nll(pred, y)


def test_vector_scaling_recovers_scales_and_biases():
    g = torch.Generator().manual_seed(2)
    n, w_star, b_star = 20000, torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.5, 0.0, -0.5])
    f = 2 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(f, -1)  # vector scaling acts on normalised logits
    y = torch.multinomial(torch.softmax(logp * w_star + b_star, -1), 1, generator=g)[:, 0]
    vs = VectorScaling().fit(f, y)

    # independent fit: scipy BFGS on the numpy NLL (bias of class 0 pinned at 0: b is shift-invariant)
    lp, yn = logp.numpy(), y.numpy()

    def nll_np(theta):
        w, b = np.exp(theta[:3]), np.concatenate([[0.0], theta[3:]])
        return -log_softmax(lp * w + b, -1)[np.arange(n), yn].mean()

    res = optimize.minimize(nll_np, np.zeros(5), method="BFGS", options={"gtol": 1e-10})
    w_ref, b_ref = np.exp(res.x[:3]), np.concatenate([[0.0], res.x[3:]])
    np.testing.assert_allclose(vs.weight.numpy(), w_ref, rtol=1e-4)
    np.testing.assert_allclose(vs.bias.numpy(), b_ref - b_ref.mean(), atol=1e-4)
    # and the MLE is near the truth (loose: the weight of the sharpest class has SE ~ 0.05 here)
    assert torch.allclose(vs.weight, w_star.double(), atol=0.2)
    assert torch.allclose(vs.bias, (b_star - b_star.mean()).double(), atol=0.2)
    pred = pbnn.Prediction(f[None], Categorical(logits=f[None]))
    assert metrics.nll(vs(pred), y) < metrics.nll(TemperatureScaling().fit(pred, y)(pred), y)


def test_variance_scaling_closed_form_and_mixture():
    g = torch.Generator().manual_seed(0)
    n = 3000
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    sigma = 0.2 + torch.rand(n, generator=g, dtype=torch.float64)
    y = mu + 2.0 * sigma * torch.randn(n, generator=g, dtype=torch.float64)  # model is 2x too narrow
    pred = pbnn.Prediction(mu[None, :, None], Normal(mu[None], sigma[None]))
    vs = VarianceScaling().fit(pred, y)
    # single Gaussian: the MLE of s has the closed form sqrt(mean(((y - mu) / sigma)^2))
    assert vs.scale == pytest.approx(float((((y - mu) / sigma) ** 2).mean().sqrt()), rel=1e-6)
    cal = vs(pred)
    assert torch.allclose(cal.mean, pred.mean) and torch.allclose(cal.stddev, vs.scale * pred.stddev)
    assert metrics.coverage_test(pred, y)["verdict"] == "under-dispersed"
    assert metrics.coverage_test(cal, y)["verdict"] == "ok"
    assert metrics.nll(cal, y) < metrics.nll(pred, y)

    # a mixture over draws: compare with scipy on the numpy mixture NLL of the scaled predictive
    loc = mu + 0.3 * torch.randn(5, n, generator=g, dtype=torch.float64)
    mix = pbnn.Prediction(loc[..., None], Normal(loc, sigma.expand(5, n)))
    vs2 = VarianceScaling().fit(mix, y)
    m = loc.numpy().mean(0)

    def nll_np(log_s):
        s = math.exp(log_s)
        dens = stats.norm.pdf(y.numpy(), m + s * (loc.numpy() - m), s * sigma.numpy()).mean(0)
        return -np.log(dens).mean()

    res = optimize.minimize_scalar(nll_np, bounds=(-3, 3), method="bounded", options={"xatol": 1e-10})
    assert vs2.scale == pytest.approx(math.exp(res.x), rel=1e-4)
    assert metrics.nll(vs2(mix), y) == pytest.approx(res.fun, rel=1e-8)


def test_calibrators_leave_the_posterior_unchanged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())
    post = pbnn.fit(model, x, y, method="map", num_steps=100, progress=False, seed=0)
    before = {k: v.clone() for k, v in post.samples.items()}
    ts = TemperatureScaling().fit(post.predict(x), y)
    cal = ts(post.predict(x))
    assert all(torch.equal(before[k], post.samples[k]) for k in before)
    expected = torch.softmax(post.predict(x).samples / ts.temperature, -1).mean(0)
    assert torch.allclose(cal.probs, expected.to(cal.probs.dtype), atol=1e-6)


def test_calibration_bad_input():
    f, y, pred = synthetic(50)
    with pytest.raises(ValueError, match="not fitted"):
        TemperatureScaling().apply(pred)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        TemperatureScaling().fit(pred, torch.full((50,), 4))
    with pytest.raises(ValueError, match="shape"):
        TemperatureScaling().fit(pred, y[:10])
    reg = pbnn.Prediction(torch.zeros(1, 3, 1), Normal(torch.zeros(1, 3), 1.0))
    with pytest.raises(ValueError, match="VarianceScaling"):
        TemperatureScaling().fit(reg, torch.zeros(3).long())
    with pytest.raises(ValueError, match="regression"):
        VarianceScaling().fit(pred, y)
    with pytest.raises(ValueError, match="4 classes"):
        VectorScaling().fit(pred, y).apply(torch.zeros(3, 2))
