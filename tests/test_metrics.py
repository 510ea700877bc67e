"""Metrics against hand-computed values, independent numpy/scipy implementations and closed forms."""

import math

import numpy as np
import pytest
import torch
from pyro.distributions import Bernoulli, Categorical, Normal
from scipy import integrate, optimize, stats

import pbnn
from pbnn import metrics

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- references
def ref_ece(p, y, num_bins, adaptive=False, reduce="ece"):
    """Plain-loop ECE / MCE: top-label confidence, bins (b/B, (b+1)/B] or equal-mass chunks."""
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(float)
    if adaptive:
        groups = np.array_split(np.argsort(conf, kind="stable"), num_bins)
    else:
        groups = []
        for b in range(num_bins):
            lo, hi = b / num_bins, (b + 1) / num_bins
            groups.append([i for i in range(len(conf)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)])
    total, worst = 0.0, 0.0
    for g in groups:
        if len(g) == 0:
            continue
        gap = abs(correct[g].mean() - conf[g].mean())
        total += len(g) / len(conf) * gap
        worst = max(worst, gap)
    return total if reduce == "ece" else worst


def ref_classwise(p, y, num_bins):
    out = []
    for c in range(p.shape[1]):
        total = 0.0
        for b in range(num_bins):
            lo, hi = b / num_bins, (b + 1) / num_bins
            g = [i for i in range(len(y)) if (lo < p[i, c] <= hi) or (b == 0 and p[i, c] == 0)]
            if g:
                total += len(g) / len(y) * abs(np.mean(y[g] == c) - p[g, c].mean())
        out.append(total)
    return np.mean(out)


def random_probs(n, c, scale=2.0):
    z = RNG.normal(size=(n, c)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def sample_labels(p):
    u = RNG.random(len(p))[:, None]
    return (u > p.cumsum(1)).sum(1).clip(0, p.shape[1] - 1)


def gaussian_pred(loc, scale):
    """Prediction with draws: loc/scale of shape [S, N]."""
    loc, scale = torch.as_tensor(loc, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64)
    scale = scale.expand_as(loc)
    return pbnn.Prediction(loc[..., None], Normal(loc, scale))


# ----------------------------------------------------------------------------- classification: hand examples
def test_hand_computed_classification():
    p = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]]
    y = [0, 1, 1, 1]
    assert metrics.accuracy(p, y) == pytest.approx(0.75)
    assert metrics.nll(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.7)) / 4)
    # Brier: (0.01+0.01) + (0.36+0.36) + (0.04+0.04) + (0.09+0.09) = 1.0 -> mean 0.25
    assert metrics.brier(p, y) == pytest.approx(0.25)
    # 10 bins: conf 0.9 -> bin (0.8, 0.9] right; 0.6 -> (0.5, 0.6] wrong; 0.8 -> (0.7, 0.8] right; 0.7 -> (0.6, 0.7]
    assert metrics.ece(p, y, num_bins=10) == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert metrics.mce(p, y, num_bins=10) == pytest.approx(0.6)
    # one equal-mass bin: |acc - mean conf| = |0.75 - 0.75|
    assert metrics.adaptive_ece(p, y, num_bins=1) == pytest.approx(0.0, abs=1e-12)
    # class-wise, 2 bins: class 0 probs .9,.6,.2,.3 -> bin2 {.9 (hit), .6 (miss)}: |0.5-0.75|, bin1 {.2,.3}: |0-0.25|
    # class 1 is the mirror image -> same gaps. ECE_c = 0.5*0.25 + 0.5*0.25 = 0.25
    assert metrics.classwise_ece(p, y, num_bins=2) == pytest.approx(0.25)


def test_known_miscalibrated_ece_analytic():
    """Always 90% sure of class 0, right 60% of the time: ECE = MCE = 0.3 (sampling sd sqrt(.24/N))."""
    n = 20000
    y = (RNG.random(n) > 0.6).astype(int)  # class 0 with prob 0.6
    p = np.tile([0.9, 0.1], (n, 1))
    tol = 4 * math.sqrt(0.24 / n)  # 4 binomial standard deviations
    assert metrics.ece(p, y) == pytest.approx(0.3, abs=tol)
    assert metrics.mce(p, y) == pytest.approx(0.3, abs=tol)


def test_perfectly_calibrated_ece_near_zero():
    """Labels drawn from the predicted probabilities: ECE is only binomial noise in each bin."""
    n, num_bins = 20000, 15
    p = random_probs(n, 4)
    y = sample_labels(p)
    b = metrics.calibration_bins(p, y, num_bins)
    keep = b["count"] > 0
    # expected |acc_b - conf_b| for a calibrated bin ~ sqrt(2/pi) * binomial sd; allow 3x
    noise = (
        b["count"][keep] / n * np.sqrt(b["confidence"][keep] * (1 - b["confidence"][keep]) / b["count"][keep])
    ).sum()
    assert metrics.ece(p, y, num_bins) < 3 * noise
    assert 3 * noise < 0.03  # the bound is tight enough to mean something
    assert metrics.adaptive_ece(p, y, num_bins) < 0.03
    assert metrics.classwise_ece(p, y, num_bins) < 0.02
    # the same probabilities made overconfident (logits x 3) have a large ECE
    over = torch.softmax(3 * torch.log(torch.as_tensor(p)), -1).numpy()
    assert metrics.ece(over, y, num_bins) > 0.1


@pytest.mark.parametrize("adaptive", [False, True])
def test_ece_matches_loop_reference(adaptive):
    p = random_probs(500, 5)
    y = sample_labels(random_probs(500, 5))  # unrelated labels: a badly calibrated predictor
    for bins in (1, 7, 15):
        assert metrics.ece(p, y, bins, adaptive=adaptive) == pytest.approx(ref_ece(p, y, bins, adaptive), abs=1e-10)
        assert metrics.mce(p, y, bins, adaptive=adaptive) == pytest.approx(
            ref_ece(p, y, bins, adaptive, "mce"), abs=1e-10
        )
    assert metrics.classwise_ece(p, y, 10) == pytest.approx(ref_classwise(p, y, 10), abs=1e-10)


def test_brier_nll_accuracy_match_reference():
    p = random_probs(300, 6)
    y = sample_labels(p)
    onehot = np.eye(6)[y]
    assert metrics.brier(p, y) == pytest.approx(((p - onehot) ** 2).sum(1).mean())
    assert metrics.nll(p, y) == pytest.approx(-np.log(p[np.arange(300), y]).mean())
    assert metrics.accuracy(p, y) == pytest.approx((p.argmax(1) == y).mean())


def test_edge_cases_empty_bins_one_class_exact_zeros():
    # all confidences in one bin: the other 14 are empty and ignored
    p = np.tile([0.55, 0.45], (10, 1))
    y = np.array([0] * 5 + [1] * 5)
    b = metrics.calibration_bins(p, y, 15)
    assert (b["count"] > 0).sum() == 1 and np.isnan(b["accuracy"][0])
    assert metrics.ece(p, y) == pytest.approx(0.05)
    # a single class: probabilities all 1, perfectly calibrated
    one = np.ones((4, 1))
    assert metrics.ece(one, [0, 0, 0, 0]) == 0.0
    assert metrics.brier(one, [0, 0, 0, 0]) == 0.0
    assert metrics.accuracy(one, [0, 0, 0, 0]) == 1.0
    # exact 0 / 1 probabilities: no nan, finite NLL (floored), zero entropy
    p01 = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.nll(p01, [0, 1]) == 0.0
    assert math.isfinite(metrics.nll(p01, [1, 1])) and metrics.nll(p01, [1, 1]) == pytest.approx(-math.log(1e-12) / 2)
    assert torch.equal(metrics.entropy(p01), torch.zeros(2, dtype=torch.float64))
    assert metrics.ece(p01, [0, 1]) == 0.0 and metrics.classwise_ece(p01, [0, 1]) == 0.0
    # fewer points than bins in adaptive ECE
    assert metrics.adaptive_ece([[0.7, 0.3]], [0], num_bins=15) == pytest.approx(0.3)
    # binary probabilities as a 1-D array of P(y = 1)
    assert metrics.brier([0.8, 0.1], [1, 0]) == pytest.approx((2 * 0.04 + 2 * 0.01) / 2)


def test_prediction_inputs_match_probabilities():
    """Categorical / Bernoulli Predictions with draws: metrics use the posterior-averaged probabilities."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 50, 3, generator=g, dtype=torch.float64) * 2
    pred = pbnn.Prediction(logits, Categorical(logits=logits))
    y = torch.randint(0, 3, (50,), generator=g)
    p_avg = torch.softmax(logits, -1).mean(0).numpy()
    assert metrics.ece(pred, y) == pytest.approx(ref_ece(p_avg, y.numpy(), 15))
    assert metrics.brier(pred, y) == pytest.approx(metrics.brier(p_avg, y))
    # mixture NLL: log of the average probability, not the average log probability
    assert metrics.nll(pred, y) == pytest.approx(-np.log(p_avg[np.arange(50), y.numpy()]).mean())
    ent = -(p_avg * np.log(p_avg)).sum(1)
    aleatoric = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean(0).numpy()
    np.testing.assert_allclose(metrics.entropy(pred).numpy(), ent, rtol=1e-10)
    np.testing.assert_allclose(metrics.mutual_information(pred).numpy(), ent - aleatoric, rtol=1e-8)
    # Bernoulli: one logit -> two columns [1 - p, p]
    f = torch.randn(5, 40, 1, generator=g)
    bern = pbnn.Prediction(f, Bernoulli(logits=f[..., 0]))
    yb = torch.randint(0, 2, (40,), generator=g).float()
    q = torch.sigmoid(f[..., 0]).mean(0).double().numpy()
    assert metrics.brier(bern, yb) == pytest.approx(((q - yb.numpy()) ** 2).mean() * 2, rel=1e-6)
    assert metrics.accuracy(bern, yb) == pytest.approx(((q > 0.5) == yb.numpy()).mean())


def test_ood_auroc_matches_pairwise_definition():
    a = RNG.integers(0, 5, 40).astype(float)  # integer scores: many ties
    b = RNG.integers(2, 8, 30).astype(float)
    pairs = [(1.0 if sb > sa else 0.5 if sb == sa else 0.0) for sa in a for sb in b]
    assert metrics.ood_auroc(a, b) == pytest.approx(np.mean(pairs))
    assert metrics.ood_auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert metrics.ood_auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    # with Predictions: a confident in-distribution set vs a uniform OOD set separates perfectly
    conf = torch.tensor([[[6.0, 0.0]] * 5])
    flat = torch.zeros(1, 5, 2)
    p_in, p_out = pbnn.Prediction(conf, Categorical(logits=conf)), pbnn.Prediction(flat, Categorical(logits=flat))
    for score in ("entropy", "max_prob"):
        assert metrics.ood_auroc(p_in, p_out, score=score) == 1.0


# ----------------------------------------------------------------------------- regression
def test_mixture_nll_matches_scipy_and_moment_matching():
    s, n = 6, 30
    loc = torch.as_tensor(RNG.normal(size=(s, n)))
    scale = torch.as_tensor(RNG.uniform(0.3, 1.5, size=(s, n)))
    pred = gaussian_pred(loc, scale)
    y = RNG.normal(size=n) * 1.5
    dens = stats.norm.pdf(y[None], loc.numpy(), scale.numpy()).mean(0)
    assert metrics.nll(pred, torch.as_tensor(y)) == pytest.approx(-np.log(dens).mean(), rel=1e-10)
    m = loc.numpy().mean(0)
    v = (scale.numpy() ** 2).mean(0) + loc.numpy().var(0)
    mm = -stats.norm.logpdf(y, m, np.sqrt(v)).mean()
    assert metrics.nll(pred, torch.as_tensor(y), moment_matched=True) == pytest.approx(mm, rel=1e-10)


def test_coverage_of_correct_and_under_dispersed_gaussian():
    n = 4000
    mu = torch.as_tensor(RNG.normal(size=n))
    y = mu + torch.as_tensor(RNG.normal(size=n))
    good = gaussian_pred(mu[None], torch.ones(1, n))
    for level in (0.5, 0.9, 0.95):
        sd = math.sqrt(level * (1 - level) / n)  # binomial sampling error of the coverage
        assert abs(metrics.coverage(good, y, level) - level) < 4 * sd
    assert metrics.coverage_test(good, y, 0.9)["verdict"] == "ok"
    narrow = gaussian_pred(mu[None], 0.5 * torch.ones(1, n))
    res = metrics.coverage_test(narrow, y, 0.9)
    expected = 2 * stats.norm.cdf(0.5 * stats.norm.ppf(0.95)) - 1  # 0.59
    assert res["verdict"] == "under-dispersed" and res["p_value"] < 1e-10
    assert res["coverage"] == pytest.approx(expected, abs=4 * math.sqrt(0.25 / n))
    wide = gaussian_pred(mu[None], 3 * torch.ones(1, n))
    assert metrics.coverage_test(wide, y, 0.9)["verdict"] == "over-dispersed"


def test_pit_uniform_when_calibrated():
    n = 3000
    # a mixture predictive: y drawn from it, so its PIT is exactly uniform
    s = 5
    loc = torch.as_tensor(RNG.normal(size=(s, n)))
    scale = torch.as_tensor(RNG.uniform(0.2, 1.0, size=(s, n)))
    comp = RNG.integers(0, s, n)
    y = torch.as_tensor(loc.numpy()[comp, np.arange(n)] + scale.numpy()[comp, np.arange(n)] * RNG.normal(size=n))
    pred = gaussian_pred(loc, scale)
    u = metrics.pit(pred, y).numpy()
    ref = stats.norm.cdf(y.numpy()[None], loc.numpy(), scale.numpy()).mean(0)
    np.testing.assert_allclose(u, ref, rtol=1e-10)
    crit = 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov 1% critical value
    assert stats.kstest(u, "uniform").statistic < crit
    assert metrics.pit_calibration_error(pred, y) < 0.02  # ~0.3/sqrt(n) = 0.006 expected
    # under-dispersed: the whole mixture shrunk by 0.4 about its mean -> PIT far from uniform
    centre = loc.mean(0)
    narrow = gaussian_pred(centre + 0.4 * (loc - centre), 0.4 * scale)
    assert stats.kstest(metrics.pit(narrow, y).numpy(), "uniform").statistic > 3 * crit
    assert metrics.pit_calibration_error(narrow, y) > 0.05


def test_crps_gaussian_closed_form():
    n = 400
    mu = RNG.normal(size=n)
    sigma = RNG.uniform(0.5, 2.0, size=n)
    y = RNG.normal(size=n) * 1.5
    z = (y - mu) / sigma
    exact = (sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))).mean()
    pred = gaussian_pred(torch.as_tensor(mu)[None], torch.as_tensor(sigma)[None])
    est = metrics.crps(pred, torch.as_tensor(y), num_samples=4000)
    # per-point sd of the estimator ~ sigma / sqrt(M); averaged over n points: ~ 1.2 / sqrt(4000 n)
    assert est == pytest.approx(exact, abs=6 * 2.0 / math.sqrt(4000 * n))
    # more draws in the Prediction than samples asked: one sample per draw
    assert metrics.crps(pred, torch.as_tensor(y), num_samples=4000, seed=1) != est


def test_crps_estimator_matches_double_loop():
    """The sorted-sample formula equals E|X - y| - 1/(2 m (m - 1)) sum_{i != j} |x_i - x_j| on the same samples."""
    loc = torch.as_tensor(RNG.normal(size=(3, 4)))
    pred = gaussian_pred(loc, torch.ones(3, 4))
    y = torch.as_tensor(RNG.normal(size=4))
    from pbnn.engine.optim import seeded

    with seeded(5):
        x = pred.sample(7).numpy()  # 21 samples per point, same RNG path as crps(seed=5)
    m = x.shape[0]
    ref = []
    for i in range(4):
        t1 = np.abs(x[:, i] - y[i].item()).mean()
        t2 = sum(abs(x[a, i] - x[b, i]) for a in range(m) for b in range(m) if a != b) / (m * (m - 1))
        ref.append(t1 - t2 / 2)
    assert metrics.crps(pred, y, num_samples=21, seed=5) == pytest.approx(np.mean(ref), rel=1e-10)


# ----------------------------------------------------------------------------- fidelity
def test_agreement_and_total_variation_hand_made():
    p = [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]
    q = [[0.6, 0.3, 0.1], [0.1, 0.4, 0.5], [0.2, 0.2, 0.6]]
    assert metrics.agreement(p, q) == pytest.approx(2 / 3)
    assert metrics.total_variation(p, q) == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert metrics.total_variation(p, p) == 0.0 and metrics.agreement(p, p) == 1.0
    with pytest.raises(ValueError, match="must match"):
        metrics.agreement(p, q[:2])


def test_wasserstein2_gaussians_closed_form():
    mu1, mu2 = RNG.normal(size=20), RNG.normal(size=20)
    s1, s2 = RNG.uniform(0.2, 2, size=20), RNG.uniform(0.2, 2, size=20)
    a = gaussian_pred(torch.as_tensor(mu1)[None], torch.as_tensor(s1)[None])
    b = gaussian_pred(torch.as_tensor(mu2)[None], torch.as_tensor(s2)[None])
    exact = np.sqrt((mu1 - mu2) ** 2 + (s1 - s2) ** 2).mean()
    assert metrics.wasserstein2(a, b) == pytest.approx(exact, rel=1e-6)
    assert metrics.wasserstein2(a, a) == pytest.approx(0.0, abs=1e-6)


def test_wasserstein2_mixture_matches_numerical_integration():
    """Mixture vs Gaussian: scipy root-finding for the quantiles and adaptive quadrature over u."""
    loc = np.array([[-1.0], [1.5], [0.3]])
    scale = np.array([[0.4], [0.7], [1.0]])
    a = gaussian_pred(torch.as_tensor(loc), torch.as_tensor(scale))
    b = gaussian_pred(torch.tensor([[0.2]]), torch.tensor([[0.9]]))

    def mixture_quantile(u):
        f = lambda t: stats.norm.cdf(t, loc[:, 0], scale[:, 0]).mean() - u
        return optimize.brentq(f, -30, 30, xtol=1e-13)

    integrand = lambda u: (mixture_quantile(u) - stats.norm.ppf(u, 0.2, 0.9)) ** 2
    w2sq, _ = integrate.quad(integrand, 0, 1, limit=200)
    # stratified atoms: 0.5% relative error on this skewed mixture at 64 per draw, 0.16% at 256
    assert metrics.wasserstein2(a, b) == pytest.approx(math.sqrt(w2sq), rel=1e-2)
    assert metrics.wasserstein2(a, b, per_draw=256) == pytest.approx(math.sqrt(w2sq), rel=3e-3)


# ----------------------------------------------------------------------------- evaluate / table / posteriors
def _tiny_fit(x, y, likelihood, out, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
    model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=likelihood)
    return pbnn.fit(model, x, y, method="svi", num_steps=100, num_samples=20, progress=False, seed=seed)


def test_evaluate_classification_and_fidelity_of_posteriors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    post = _tiny_fit(x, y, pbnn.likelihoods.Categorical(), 2, 0)
    other = _tiny_fit(x, y, pbnn.likelihoods.Categorical(), 2, 1)
    res = pbnn.evaluate(post, x, y)
    pred = post.predict(x)
    assert {"accuracy", "nll", "brier", "ece"} <= set(res)
    assert res["nll"] == pytest.approx(metrics.nll(pred, y))
    assert res["ece"] == pytest.approx(ref_ece(pred.probs.double().numpy(), y.numpy(), 15))
    assert res["accuracy"] > 0.8
    assert metrics.agreement(post, other, x) == pytest.approx(metrics.agreement(pred, other.predict(x)))
    assert 0 < metrics.total_variation(post, other, x) < 0.5
    with pytest.raises(ValueError, match="needs the inputs x"):
        metrics.agreement(post, other)
    text = metrics.table({"a": res, "b": pbnn.evaluate(other, x, y)})
    assert text.splitlines()[0].split()[:3] == ["method", "accuracy", "nll"] and len(text.splitlines()) == 4


def test_evaluate_regression_keys_and_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(100, generator=g)
    post = _tiny_fit(x, y, pbnn.likelihoods.Gaussian(), 1, 0)
    res = pbnn.evaluate(post, x, y)
    pred = post.predict(x)
    assert {"rmse", "nll", "coverage_90", "crps"} <= set(res)
    assert res["rmse"] == pytest.approx(metrics.rmse(pred, y))
    assert res["coverage_90"] == pytest.approx(metrics.coverage(pred, y, 0.9))
    assert res["nll"] == pytest.approx(metrics.nll(pred, y))
    assert res["crps"] == pytest.approx(metrics.crps(pred, y, seed=0))
    assert pbnn.evaluate(pred, None, y) == res
    assert metrics.wasserstein2(post, post, x) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.ece([[0.5, 0.6]], [0])
    with pytest.raises(ValueError, match="logits"):
        metrics.brier([[2.0, -1.0]], [0])
    with pytest.raises(ValueError, match=r"shape \[N\] = \[2\]"):
        metrics.accuracy([[0.5, 0.5], [0.5, 0.5]], [0, 1, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        metrics.nll([[0.5, 0.5]], [2])
    with pytest.raises(ValueError, match="integer class"):
        metrics.ece([[0.5, 0.5]], [0.5])
    with pytest.raises(ValueError, match="num_bins"):
        metrics.ece([[0.5, 0.5]], [0], num_bins=0)
    reg = gaussian_pred(torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="classification"):
        metrics.ece(reg, [0, 1, 0])
    with pytest.raises(ValueError, match="targets have shape"):
        metrics.crps(reg, torch.zeros(4))
    logits = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="regression"):
        metrics.crps(pbnn.Prediction(logits, Categorical(logits=logits)), torch.zeros(3))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        metrics.nll(pbnn.Prediction(logits, Categorical(logits=logits)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="x=None"):
        pbnn.evaluate(reg, torch.zeros(3, 1), torch.zeros(3))


# ----------------------------------------------------------------------------- issue 27: floor and bad inputs
def test_nll_of_a_prediction_agrees_with_its_probs_and_honours_the_floor():
    # two draws, both sure of class 0; the label of point 0 is 1: its mixture probability is
    # ~e^-370 (-370 nats unfloored), floored at PROB_FLOOR it costs -log(1e-12) = 27.6 nats
    logits = torch.tensor([[[370.0, 0.0], [0.0, 2.0]], [[380.0, 0.0], [0.0, 2.0]]])
    pred = pbnn.Prediction(logits, Categorical(logits=logits))
    y = torch.tensor([1, 1])
    expected = (-math.log(metrics.PROB_FLOOR) - math.log(torch.sigmoid(torch.tensor(2.0)).item())) / 2
    assert metrics.nll(pred, y) == pytest.approx(expected, rel=1e-6)
    assert metrics.nll(pred, y) == metrics.nll(pred.probs, y)
    assert pbnn.evaluate(pred, None, y)["nll"] == metrics.nll(pred.probs, y)
    bern = pbnn.Prediction(logits[..., :1] * 0 + 400.0, Bernoulli(logits=torch.full((2, 2), 400.0)))
    assert metrics.nll(bern, torch.tensor([0, 1])) == pytest.approx(-math.log(metrics.PROB_FLOOR) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="moment_matched=True is for regression"):
        metrics.nll(pred, y, moment_matched=True)


def test_regression_metrics_refuse_targets_of_the_wrong_length():
    pred = pbnn.Prediction(torch.zeros(2, 5, 1), Normal(torch.zeros(2, 5), 1.0))
    for fn in (metrics.rmse, metrics.nll, metrics.coverage, metrics.crps, metrics.pit):
        for y in (torch.zeros(1), torch.zeros(10), torch.zeros(5, 2)):  # no broadcasting, no reshaping across points
            with pytest.raises(ValueError, match=r"targets have shape .* prediction is for shape \(5,\)"):
                fn(pred, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.rmse(pred, torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0]))
    assert metrics.rmse(pred, torch.ones(5, 1)) == metrics.rmse(pred, torch.ones(5)) == 1.0


def test_evaluate_checks_what_it_is_given(make_net):
    pred = pbnn.Prediction(torch.zeros(2, 5, 1), Normal(torch.zeros(2, 5), 1.0))
    with pytest.raises(ValueError, match=r"targets have shape \(1,\)"):
        pbnn.evaluate(pred, None, torch.zeros(1))
    with pytest.raises(ValueError, match="needs a pbnn.Posterior .* or a pbnn.Prediction .* got Tensor"):
        pbnn.evaluate(torch.zeros(5), None, torch.zeros(5))
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        pbnn.evaluate(pred, None, torch.zeros(5), num_bins=0)
    cls = pbnn.Prediction(torch.zeros(2, 4, 3), Categorical(logits=torch.zeros(2, 4, 3)))
    with pytest.raises(ValueError, match=r"non-integer value 1.5 at point 2"):
        pbnn.evaluate(cls, None, torch.tensor([0.0, 1.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\).*\[0, 3\]"):
        pbnn.evaluate(cls, None, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"shape \[N\] = \[4\]"):
        pbnn.evaluate(cls, None, torch.tensor([0, 1, 2]))
    post = pbnn.fit(pbnn.BNN(make_net()), torch.randn(8, 1), torch.randn(8), method="map", num_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"pass x\[:, None\]"):
        pbnn.evaluate(post, torch.randn(5), torch.randn(5))


def test_calibration_fits_check_labels_and_shapes():
    logits = torch.zeros(4, 3)
    for cal in (pbnn.calibration.TemperatureScaling(), pbnn.calibration.VectorScaling()):
        with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
            cal.fit(logits, torch.tensor([0, 1, 2, 3]))
        with pytest.raises(ValueError, match="non-integer value"):
            cal.fit(logits, torch.tensor([0.0, 1.0, 2.5, 1.0]))
        with pytest.raises(ValueError, match=r"shape \[N\] = \[4\]"):
            cal.fit(logits, torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="logits must have shape"):
            cal.fit(torch.zeros(4), torch.tensor([0, 1, 1, 0]))
    pred = pbnn.Prediction(torch.zeros(1, 5, 1), Normal(torch.zeros(1, 5), 1.0))
    with pytest.raises(ValueError, match=r"targets have shape \(1,\)"):
        pbnn.calibration.VarianceScaling().fit(pred, torch.zeros(1))
