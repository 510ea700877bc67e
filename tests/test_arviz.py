import dataclasses
import logging
import warnings

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.posterior.arviz_io import export_layout

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


def tiny_net(out=1, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, out))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25, 1, generator=g)
    return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(25, generator=g)


@pytest.fixture(scope="module")
def post(data):
    x, y = data
    return pbnn.fit(pbnn.BNN(tiny_net()), x, y, method="svi", num_steps=100, num_samples=100, seed=0, progress=False)


# ------------------------------------------------------------------ groups, dims, layout
def test_groups_dims_and_shapes(post):
    idata = post.to_arviz(x_new=torch.zeros(7, 1))
    groups = set(idata.groups())
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data", "constant_data"} <= groups
    assert {"predictions", "predictions_constant_data"} <= groups
    # 100 independent SVI draws: 4 chains of 25 (ArviZ's R-hat needs >= 2 chains)
    assert idata.posterior["0.weight"].dims == ("chain", "draw", "0.out", "0.in")
    assert idata.posterior["0.weight"].shape == (4, 25, 3, 1)
    assert idata.posterior["0.bias"].dims == ("chain", "draw", "0.out")
    assert idata.posterior["2.weight"].dims == ("chain", "draw", "2.out", "2.in")
    assert idata.posterior["sigma"].shape == (4, 25)
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")
    assert idata.posterior_predictive["obs"].shape == (4, 25, 25)
    assert idata.predictions["obs"].dims == ("chain", "draw", "pred_id")
    assert idata.predictions["obs"].shape == (4, 25, 7)
    np.testing.assert_array_equal(idata.predictions_constant_data["x"].values, np.zeros((7, 1)))
    np.testing.assert_array_equal(idata.constant_data["x"].values, post.data.x.numpy())
    np.testing.assert_allclose(idata.observed_data["obs"].values, post.data.y.numpy())
    # the draws keep their order: chain c, draw d is flat draw 25 c + d
    np.testing.assert_array_equal(idata.posterior["0.weight"].values[2, 3], post.flat_samples()["0.weight"][53].numpy())


def test_log_likelihood_group_is_the_pointwise_log_density(post):
    idata = post.to_arviz()
    flat = post.flat_samples()
    s = 17
    ll = post.model.log_likelihood({k: v[s] for k, v in flat.items()}, post.data.x, post.data.y)
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0, s], ll.numpy(), rtol=1e-5, atol=1e-5)


def test_log_likelihood_is_computed_once_and_survives_save_load(post, tmp_path, monkeypatch):
    first = post.log_likelihood()
    calls = []
    monkeypatch.setattr(pbnn.Posterior, "predict", lambda self, *a, **k: calls.append(1))
    assert post.log_likelihood() is first and post.to_arviz() is not None
    assert calls == []  # neither call evaluated the network again
    monkeypatch.undo()
    post.save(tmp_path / "p.pt")
    loaded = pbnn.Posterior.load(tmp_path / "p.pt", model=post.model)
    assert "_training_cache" not in vars(loaded)  # the cache is not saved, the loaded one recomputes it
    torch.testing.assert_close(loaded.log_likelihood(), first)


def test_posterior_predictive_draws_y_from_each_draws_conditional():
    """A known posterior: 400 draws of a linear net with a fixed noise scale 0.5; y_rep - f(x) must
    be N(0, 0.25) at every point, with one draw of y per posterior draw, reproducible by seed."""
    x = torch.linspace(-1, 1, 30)[:, None]
    model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    g = torch.Generator().manual_seed(1)
    samples = {"weight": torch.randn(1, 400, 1, 1, generator=g), "bias": torch.randn(1, 400, 1, generator=g)}
    post = pbnn.Posterior(model, samples, data=pbnn.data.Data(x, torch.zeros(30)), method="test")
    state = torch.random.get_rng_state()
    idata = post.to_arviz(x_new=x[:10], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    f = (samples["weight"][0, :, 0] * x[:, 0] + samples["bias"][0]).numpy()  # [400, 30]
    rep = idata.posterior_predictive["obs"].values.reshape(400, 30)
    resid = (rep - f) / 0.5
    assert abs(resid.mean()) < 0.05 and abs(resid.std() - 1) < 0.05  # 12000 draws: SE 0.01
    new = idata.predictions["obs"].values.reshape(400, 10)
    resid_new = (new - f[:, :10]) / 0.5
    assert abs(resid_new.mean()) < 0.1 and abs(resid_new.std() - 1) < 0.1
    assert not np.allclose(new, rep[:, :10])  # fresh noise, not the training draws again
    again = post.to_arviz(x_new=x[:10], seed=3)
    np.testing.assert_array_equal(again.posterior_predictive["obs"].values, idata.posterior_predictive["obs"].values)
    other = post.to_arviz(seed=4)
    assert not np.array_equal(other.posterior_predictive["obs"].values, idata.posterior_predictive["obs"].values)


def test_y_new_goes_with_x_new_and_is_checked(post):
    idata = post.to_arviz(x_new=torch.zeros(4, 1), y_new=torch.arange(4.0))
    assert idata.predictions_constant_data["obs"].dims == ("pred_id",)
    np.testing.assert_array_equal(idata.predictions_constant_data["obs"].values, np.arange(4.0))
    with pytest.raises(ValueError, match="y_new needs x_new"):
        post.to_arviz(y_new=torch.zeros(4))
    with pytest.raises(ValueError, match="targets must have shape"):
        post.to_arviz(x_new=torch.zeros(4, 1), y_new=torch.zeros(5))
    with pytest.raises(ValueError):
        post.to_arviz(x_new=torch.zeros(4, 2))  # two features for a one-feature net


def test_multi_output_and_classification_dims():
    x = torch.randn(12, 1)
    two = pbnn.Posterior(
        pbnn.BNN(tiny_net(out=2), likelihood=pbnn.likelihoods.Gaussian(0.3)),
        {n: p.detach().expand((1, 8) + p.shape).clone() for n, p in tiny_net(out=2).named_parameters()},
        data=pbnn.data.Data(x, torch.zeros(12, 2)),
        method="test",
    )
    idata = two.to_arviz()
    assert idata.observed_data["obs"].dims == ("obs_id", "obs_dim_0")
    assert idata.posterior_predictive["obs"].shape == (2, 4, 12, 2)
    assert idata.log_likelihood["obs"].shape == (2, 4, 12)
    labels = torch.randint(0, 3, (12,))
    post = pbnn.fit(
        pbnn.BNN(tiny_net(out=3), likelihood=pbnn.likelihoods.Categorical()),
        x,
        labels,
        method="svi",
        num_steps=5,
        num_samples=8,
        seed=0,
        progress=False,
    )
    rep = post.to_arviz().posterior_predictive["obs"].values
    assert rep.shape == (2, 4, 12) and set(np.unique(rep)) <= {0, 1, 2}


def test_hand_written_model_keeps_site_names_and_learned_params():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sigma = pyro.param("sigma", torch.tensor(0.5), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, sigma), obs=y)

    x = torch.randn(30, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.2 * torch.randn(30)
    post = pbnn.fit(model, x, y, method="svi", num_steps=100, lr=0.05, num_samples=16, seed=0, progress=False)
    idata = post.to_arviz()
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    # the learned pyro.param is a point mass in the posterior, so az.summary lists it
    sigma = float(post.fixed["sigma"].detach())
    np.testing.assert_allclose(idata.posterior["sigma"].values, sigma)
    assert az.summary(idata, var_names=["sigma"], kind="stats", round_to="none")["mean"].iloc[0] == pytest.approx(sigma)
    assert idata.posterior_predictive["obs"].shape == (4, 4, 30)


def test_laplace_sigma_and_fixed_layers():
    """Laplace keeps sigma as a point estimate (post.fixed): it is in the posterior, repeated over
    the draws; the last-layer Laplace's first layer is fitted as a point: constant_data."""
    x = torch.linspace(-2, 2, 30)[:, None]
    y = torch.sin(x[:, 0])
    post = pbnn.fit(
        pbnn.BNN(tiny_net()),
        x,
        y,
        method="laplace",
        subset="last_layer",
        map_steps=50,
        num_samples=8,
        seed=0,
        progress=False,
    )
    idata = post.to_arviz()
    np.testing.assert_allclose(idata.posterior["sigma"].values, float(post.fixed["sigma"]))
    assert az.summary(idata, var_names=["sigma"], kind="stats").shape[0] == 1
    assert "0.weight" not in idata.posterior and idata.constant_data["0.weight"].dims == ("0.out", "0.in")
    np.testing.assert_array_equal(idata.constant_data["0.weight"].values, post.fixed["0.weight"].numpy())


def test_layout_of_independent_draws_gives_rhat_without_shape_warnings(caplog):
    assert export_layout(4, 500) == (4, 500)
    assert export_layout(8, 1) == (2, 4) and export_layout(1, 1000) == (4, 250) and export_layout(1, 30) == (3, 10)
    assert export_layout(5, 1) == (1, 5) and export_layout(1, 1) == (1, 1)
    g = torch.Generator().manual_seed(0)
    members = {"weight": torch.randn(8, 1, 1, 1, generator=g), "bias": torch.randn(8, 1, 1, generator=g)}
    x = torch.randn(10, 1)
    post = pbnn.Posterior(
        pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(1.0)),
        members,
        data=pbnn.data.Data(x, torch.zeros(10)),
        method="ensemble",
    )
    with caplog.at_level(logging.WARNING, logger="arviz"):
        summary = az.summary(post.to_arviz())
    assert "Shape validation failed" not in caplog.text
    assert np.isfinite(summary["r_hat"]).all() and (summary["ess_bulk"] > 0).all()


def test_one_chain_is_split_in_order_with_its_stats():
    """One chain of 12 draws (e.g. one SG-MCMC chain) becomes 3 consecutive blocks of 4, its
    sample_stats laid out the same way."""
    x = torch.randn(6, 1)
    w = torch.arange(12.0).reshape(1, 12, 1, 1)
    post = pbnn.Posterior(
        pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(1.0)),
        {"weight": w, "bias": torch.zeros(1, 12, 1)},
        data=pbnn.data.Data(x, torch.zeros(6)),
        method="test",
        sample_stats={"step_size": torch.arange(12.0)[None]},
    )
    idata = post.to_arviz()
    np.testing.assert_array_equal(idata.posterior["weight"].values[..., 0, 0], np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(idata.sample_stats["step_size"].values, np.arange(12.0).reshape(3, 4))
    flat_ll = post.log_likelihood().reshape(12, 6).numpy()
    np.testing.assert_array_equal(idata.log_likelihood["obs"].values.reshape(12, 6), flat_ll)


def test_dims_of_convolutions_and_other_sites():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    model = pbnn.BNN(net)
    assert pbnn.arviz_io.site_dims(model, "0.weight", 4) == ["0.out", "0.in", "0.kernel_0", "0.kernel_1"]
    assert pbnn.arviz_io.site_dims(model, "0.bias", 1) == ["0.out"]
    assert pbnn.arviz_io.site_dims(model, "2.weight", 2) == ["2.out", "2.in"]
    assert pbnn.arviz_io.site_dims(model, "sigma", 0) == []
    assert pbnn.arviz_io.site_dims(lambda x, y=None: None, "w", 2) == ["w_dim_0", "w_dim_1"]


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


def test_nuts_energy_is_the_hamiltonian():
    """On a standard normal in 2-D the Hamiltonian -log p(z) + |r|^2 / 2 has mean D = 2 and
    variance D = 2 (a chi-square with 2D dof, halved); BFMI is near 1."""
    from pbnn.engine.chains import sample_hmc
    from pbnn.kernels.hmc import value_and_grad

    target = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))
    out = sample_hmc(
        "nuts",
        target,
        torch.zeros(16, 2),
        num_samples=60,
        warmup=40,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    energy = out.stats["energy"]
    assert abs(float(energy.mean()) - 2.0) < 0.25 and abs(float(energy.var()) - 2.0) < 0.8
    assert az.bfmi(energy.numpy()).mean() > 0.7


# ------------------------------------------------------------------ every backend through ArviZ
OPTIONS = {
    "num_steps": 30,
    "num_samples": 8,
    "warmup": 8,
    "num_chains": 2,
    "map_steps": 20,
    "num_members": 8,
    "cycle_length": 4,
    "num_cycles": 2,
    "max_tree_depth": 3,
    "num_leapfrog_steps": 5,
    "thinning": 1,
}
STATS = {  # what ArviZ reads from each sampler's sample_stats
    "nuts": {"diverging", "lp", "acceptance_rate", "step_size", "tree_depth", "n_steps", "energy"},
    "hmc": {"diverging", "lp", "acceptance_rate", "step_size", "n_steps", "energy"},
    "mh": {"lp", "acceptance_rate"},
}


@pytest.fixture(scope="module")
def exports(data):
    x, y = data
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in sorted(pbnn.infer.BACKENDS.items()):
            fields = {f.name for f in dataclasses.fields(cls)}
            opts = {k: v for k, v in OPTIONS.items() if k in fields}
            post = pbnn.fit(pbnn.BNN(tiny_net()), x, y, method=name, seed=0, progress=False, **opts)
            out[name] = (post, post.to_arviz(x_new=torch.linspace(-3, 3, 5)[:, None]))
    return out


@pytest.mark.parametrize("name", sorted(pbnn.infer.BACKENDS))
def test_every_backend_runs_through_arviz(exports, name):
    post, idata = exports[name]
    draws = post.num_chains * post.num_draws
    assert idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == draws
    assert idata.posterior_predictive["obs"].shape[:2] == idata.posterior["sigma"].shape
    assert STATS.get(name, set()) <= set(getattr(idata, "sample_stats", {}))
    if name in ("sgld", "sghmc", "psgld", "csgld", "csghmc"):
        assert "step_size" in idata.sample_stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k and small-sample warnings of these tiny fits
        assert np.isfinite(az.summary(idata, var_names=["sigma"], kind="stats")["mean"]).all()
        az.plot_ppc(idata, num_pp_samples=min(4, draws))
        az.plot_trace(idata, var_names=["sigma", "2.bias"])
        plt.close("all")
        if draws == 1:  # MAP, SWA: one point, no spread: LOO, LOO-PIT and compare need several draws
            return
        loo = az.loo(idata)
        pit = az.loo_pit(idata, y="obs")
        other = "nuts" if name != "nuts" else "svi"
        compare = az.compare({name: idata, other: exports[other][1]})
    ll = post.log_likelihood().reshape(draws, -1)
    lppd = float((torch.logsumexp(ll, 0) - np.log(draws)).sum())
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo + loo.p_loo == pytest.approx(lppd, rel=1e-4, abs=1e-3)
    assert pit.shape == (25,) and ((pit >= 0) & (pit <= 1)).all()
    assert set(compare.index) == {name, other}
