"""Memory-lean posteriors and the streamed predictive (issue 26, items 5 and 6)."""

import io
import math

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical, Laplace, Normal
from scipy.optimize import brentq
from scipy.stats import laplace as sp_laplace
from scipy.stats import norm
from torch import nn
from torch.distributions import Independent
from torch.utils.data import DataLoader, TensorDataset

import pbnn
import pbnn.posterior.posterior as posterior_module
from pbnn.posterior import serialization
from pbnn.posterior.approx import FlatApproximation, LazyDraws, SWAGNormal
from pbnn.posterior.predictive import Prediction, StreamedPrediction, mixture_quantile, predict_bnn


def _streamed(full_fn, f, n, draw_chunk=7, point_chunk=5, quantile_points=4):
    """A StreamedPrediction over the per-draw outputs ``f`` [S, N, out] in small blocks, and the full one."""
    x = torch.arange(n)
    pred = StreamedPrediction(
        lambda w, xb: full_fn(w["f"][:, xb]),
        lambda a, b: {"f": f[a:b]},
        f.shape[0],
        x,
        draw_chunk=draw_chunk,
        point_chunk=point_chunk,
        quantile_points=quantile_points,
    )
    return pred, full_fn(f)


def _close(a, b, tol=1e-6):
    assert a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def test_streamed_regression_summaries_equal_the_materialised_ones():
    torch.manual_seed(0)
    f = torch.randn(23, 13, 2)  # loc and log-scale per draw and point

    def full(fb):
        return Prediction(fb, Normal(fb[..., 0], fb[..., 1].exp()))

    pred, ref = _streamed(full, f, 13)
    assert pred._full is None and not pred._single  # several blocks, nothing [S, N, out] kept
    y = torch.randn(13)
    for name in ("mean", "aleatoric_variance", "epistemic_variance", "variance", "stddev"):
        _close(getattr(pred, name), getattr(ref, name))
    _close(pred.log_prob(y), ref.log_prob(y))
    _close(pred.pointwise_log_likelihood(y), ref.pointwise_log_likelihood(y))
    _close(pred.cdf(y), ref.cdf(y))
    for a, b in zip(pred.interval(0.9), ref.interval(0.9)):
        _close(a, b)
    _close(pred.quantile(0.3), ref.quantile(0.3))
    assert pred._full is None
    assert torch.equal(pred.samples, f)  # materialised on request
    assert pred.num_draws == 23 and "streamed" in repr(pred)


def test_streamed_multi_output_regression():
    torch.manual_seed(1)
    f = torch.randn(9, 6, 3)

    def full(fb):
        return Prediction(fb, Independent(Normal(fb, 0.3), 1))

    pred, ref = _streamed(full, f, 6, draw_chunk=4, point_chunk=4)
    y = torch.randn(6, 3)
    _close(pred.mean, ref.mean)
    _close(pred.variance, ref.variance)
    _close(pred.log_prob(y), ref.log_prob(y))
    with pytest.raises(ValueError, match=r"targets must have shape \[6, 3\]"):
        pred.log_prob(torch.zeros(6))


@pytest.mark.parametrize("kind", ["categorical", "bernoulli"])
def test_streamed_classification_summaries_equal_the_materialised_ones(kind):
    torch.manual_seed(2)
    if kind == "categorical":
        f = 3 * torch.randn(31, 11, 4)
        y = torch.randint(0, 4, (11,))

        def full(fb):
            return Prediction(fb, Categorical(logits=fb))
    else:
        f = 3 * torch.randn(31, 11, 1)
        y = torch.randint(0, 2, (11,)).float()

        def full(fb):
            return Prediction(fb, Bernoulli(logits=fb[..., 0]))

    pred, ref = _streamed(full, f, 11)
    for name in (
        "probs",
        "mean",
        "variance",
        "epistemic_variance",
        "entropy",
        "aleatoric_entropy",
        "mutual_information",
    ):
        _close(getattr(pred, name), getattr(ref, name))
    _close(pred.log_prob(y), ref.log_prob(y))
    for a, b in zip(pred.interval(0.8), ref.interval(0.8)):
        _close(a, b)
    with pytest.raises(ValueError, match="class labels must lie in"):
        pred.log_prob(torch.full((11,), 7))


def _brentq_quantile(sp, loc, scale, q):
    """The old way: one scalar root search per point, on the float64 mixture CDF."""
    loc, scale = loc.double().numpy(), scale.double().numpy()
    return brentq(lambda t: sp.cdf(t, loc, scale).mean() - q, -1e3, 1e3, xtol=1e-13, rtol=1e-14)


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_vectorised_interval_equals_per_point_root_finding(family):
    torch.manual_seed(3)
    S, N = 40, 25
    loc = 3 * torch.randn(S, N, dtype=torch.float64)
    scale = torch.rand(S, N, dtype=torch.float64) * 2 + 0.05
    scale[:, 0] = 1e-3  # a mixture of near-atoms: a CDF of steep steps and flat stretches
    dist_cls, sp = (Normal, norm) if family == "normal" else (Laplace, sp_laplace)
    for q in (0.04, 0.51, 0.93, 0.999):  # not multiples of 1/S, where the near-atoms' CDF is flat
        got = mixture_quantile(dist_cls(loc, scale), q)
        for i in range(N):
            assert abs(float(got[i]) - _brentq_quantile(sp, loc[:, i], scale[:, i], q)) < 1e-6, (q, i)
    loc, scale = loc.float(), scale.float()
    lo, hi = Prediction(loc[..., None], dist_cls(loc, scale)).interval(0.88)  # quantiles 0.06 and 0.94
    for i in range(N):  # float32 parameters: the float32 result rounds the float64 root
        assert abs(float(lo[i]) - _brentq_quantile(sp, loc[:, i], scale[:, i], 0.06)) < 1e-5
        assert abs(float(hi[i]) - _brentq_quantile(sp, loc[:, i], scale[:, i], 0.94)) < 1e-5


# ----------------------------------------------------------------------------- through the Posterior
def _data(n=40, classes=None):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    if classes:
        return x, (x[:, 0] > 0).long() + (x[:, 0] > 1).long()
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _mlp(out=1, width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, out))


@pytest.fixture
def small_budget(monkeypatch):
    """A tiny BUDGET, so predictions on a few dozen points stream over many blocks."""
    import pbnn.posterior.predictive as predictive

    monkeypatch.setattr(posterior_module, "BUDGET", 2**10)
    monkeypatch.setattr(predictive, "BUDGET", 2**10)


def test_svi_posterior_draws_on_demand_and_reproducibly():
    x, y = _data()
    model = pbnn.BNN(_mlp(), likelihood=pbnn.likelihoods.Gaussian(0.1))
    kw = dict(method="svi", num_steps=20, num_samples=250, progress=False, seed=3)
    post = pbnn.fit(model, x, y, **kw)
    assert post.lazy_draws is not None and post._samples is None  # nothing stored by the fit
    post.predict(x)
    assert post._samples is None  # nor by predict
    again = pbnn.fit(model, x, y, **kw)
    assert post.num_chains == 1 and post.num_draws == 250
    for k, v in post.samples.items():
        assert v.shape[:2] == (1, 250)
        assert torch.equal(v, again.samples[k])
    lazy = post.lazy_draws
    parts = [lazy.get(a, min(a + 37, 250)) for a in range(0, 250, 37)]  # any chunks, same numbers
    for k, v in post.flat_samples().items():
        assert torch.equal(torch.cat([p[k] for p in parts]), v)
    other = pbnn.fit(model, x, y, **{**kw, "seed": 4})
    assert not torch.equal(other.samples["0.weight"], post.samples["0.weight"])


def test_posterior_predict_streams_and_matches_the_materialised_predictive(small_budget):
    x, y = _data()
    model = pbnn.BNN(_mlp(), likelihood=pbnn.likelihoods.Gaussian(0.1))
    post = pbnn.fit(model, x, y, method="svi", num_steps=20, num_samples=64, progress=False, seed=0)
    pred = post.predict(x)
    assert isinstance(pred, StreamedPrediction) and not pred._single
    ref = predict_bnn(model, post.flat_samples(), post.fixed, x)
    _close(pred.mean, ref.mean)
    _close(pred.variance, ref.variance)
    _close(pred.log_prob(y), ref.log_prob(y))
    for a, b in zip(pred.interval(0.9), ref.interval(0.9)):
        _close(a, b)
    few = post.predict(x, num_samples=10)  # draws made on demand: the first ones
    ref10 = predict_bnn(model, {k: v[:10] for k, v in post.flat_samples().items()}, post.fixed, x)
    _close(few.mean, ref10.mean)
    assert torch.equal(post.predict(x, num_samples=100, seed=1).mean, post.predict(x, num_samples=100, seed=1).mean)


def test_classification_posterior_streams(small_budget):
    x, y = _data(classes=3)
    model = pbnn.BNN(_mlp(out=3), likelihood=pbnn.likelihoods.Categorical())
    post = pbnn.fit(model, x, y, method="svi", num_steps=20, num_samples=32, progress=False, seed=0)
    pred = post.predict(x)
    ref = predict_bnn(model, post.flat_samples(), post.fixed, x)
    assert not pred._single
    _close(pred.probs, ref.probs)
    _close(pred.mutual_information, ref.mutual_information)
    _close(post.log_likelihood().reshape(32, -1), ref.pointwise_log_likelihood(y))


def test_multiswag_chains_draw_from_their_own_run():
    means = torch.tensor([[-100.0, 0.0], [100.0, 0.0]])
    q = SWAGNormal(means, torch.ones(2, 2), torch.zeros(2, 2, 0), 1.0)
    approx = FlatApproximation(q, [("w", torch.Size([2]), torch.distributions.transforms.identity_transform)])
    w = LazyDraws(approx, num_draws=30, seed=0, num_chains=2).materialise()["w"]
    assert w.shape == (2, 30, 2)
    assert (w[0, :, 0] < -90).all() and (w[1, :, 0] > 90).all()


# ----------------------------------------------------------------------------- files
pytestmark = pytest.mark.filterwarnings("ignore::pbnn.core.data.FitWarning")  # fits of a few steps


def _wide_model():
    """~50k weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 220), nn.Tanh(), nn.Linear(220, 220), nn.Tanh(), nn.Linear(220, 1))
    return pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))


@pytest.mark.parametrize(
    "method,kw",
    [
        ("svi", dict(num_steps=3)),
        ("laplace", dict(hessian="diag", subset="all", map_steps=3, refine=False, prior_precision=1.0)),
        ("laplace", dict(hessian="kfac", subset="all", map_steps=3, refine=False, prior_precision=1.0)),
    ],
    ids=["svi-mean-field", "laplace-diag", "laplace-kfac"],
)
def test_saved_approximate_posterior_is_small(tmp_path, method, kw):
    x, y = _data(30)
    model = _wide_model()
    num_weights = sum(p.numel() for p in model.net.parameters())
    assert 45_000 < num_weights < 55_000
    post = pbnn.fit(model, x, y, method=method, progress=False, seed=0, **kw)
    path = tmp_path / "post.pt"
    post.save(path)
    size = path.stat().st_size
    assert size <= 3 * 4 * num_weights + 2**20, size  # the bound (1000 stored draws: 200 MB)
    loaded = pbnn.Posterior.load(path, model=model)
    assert loaded.lazy_draws is not None
    idx = torch.tensor([0, 999])
    for k, v in post.lazy_draws.take(idx).items():
        assert torch.equal(loaded.lazy_draws.take(idx)[k], v)


def test_version_1_files_still_load(tmp_path):
    x, y = _data()
    model = pbnn.BNN(_mlp(), likelihood=pbnn.likelihoods.Gaussian(0.1))
    post = pbnn.fit(model, x, y, method="svi", num_steps=5, num_samples=20, progress=False, seed=0)
    post.samples = post.samples  # stored draws, as version 1 files held them
    buf = io.BytesIO(serialization.dump({"x": 1}))
    path = tmp_path / "v2.pt"
    post.save(path)
    with open(path, "rb") as f:
        state = serialization.read(f, "v2")
    del state["draws"]
    old_version = serialization.VERSION
    try:
        serialization.VERSION = 1
        data = serialization.dump(state)
    finally:
        serialization.VERSION = old_version
    assert b'"version": 1' in data and buf.getvalue()
    (tmp_path / "v1.pt").write_bytes(data)
    loaded = pbnn.Posterior.load(tmp_path / "v1.pt", model=model)
    assert loaded.lazy_draws is None
    for k, v in post.samples.items():
        assert torch.equal(loaded.samples[k], v)


# ----------------------------------------------------------------------------- evaluate(post, loader)
@pytest.mark.parametrize("classes", [None, 3])
def test_evaluate_streams_over_a_loader(classes):
    x, y = _data(60, classes)
    model = pbnn.BNN(
        _mlp(out=classes or 1),
        likelihood=pbnn.likelihoods.Categorical() if classes else pbnn.likelihoods.Gaussian(0.2),
    )
    post = pbnn.fit(model, x, y, method="svi", num_steps=20, num_samples=40, progress=False, seed=0)
    whole = pbnn.evaluate(post, x, y)
    streamed = pbnn.evaluate(post, DataLoader(TensorDataset(x, y), batch_size=16))
    assert whole.keys() == streamed.keys()
    for k in whole:
        if k == "crps":  # Monte Carlo: other draws per batch
            assert abs(whole[k] - streamed[k]) < 0.05 * whole[k]
        else:
            assert math.isclose(whole[k], streamed[k], rel_tol=1e-5, abs_tol=1e-6), k
    with pytest.raises(ValueError, match="batches"):
        pbnn.evaluate(post, [(x, y, y)])
    with pytest.raises(ValueError, match="empty"):
        pbnn.evaluate(post, [])
    with pytest.raises(ValueError, match="targets y"):
        pbnn.evaluate(post, x)
