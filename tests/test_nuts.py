"""NUTS and HMC: exactness on closed forms, known targets, reproducibility, diagnostics."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
import pbnn.engine.chains as chains_module
from pbnn.core.data import FitWarning
from pbnn.engine.chains import (
    CACHED_COMPILE_SECONDS,
    AutoCompile,
    compile_pays,
    tree_depth_warning,
)
from pbnn.engine.chains import sample_hmc as sample_chains
from pbnn.kernels import hmc
from pbnn.kernels.hmc import value_and_grad
from pbnn.posterior.diagnostics import ess_bulk


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation cost (badly so on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ess(x: torch.Tensor) -> torch.Tensor:
    """Bulk ESS per column of ``[C, S, K]`` draws."""
    return ess_bulk(x.double())


def check_moments(theta: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float = 4.5) -> None:
    """Posterior mean and covariance of draws ``theta [C, S, K]`` within ``z`` Monte Carlo
    standard errors of the truth, each error computed from that quantity's own ESS.

    With ~3 + 6 checks per call, z = 4.5 keeps the false-failure rate per run below 1e-4,
    while a sampler off by a fraction of a posterior standard deviation fails.
    """
    theta, mean, cov = theta.double(), mean.double(), cov.double()
    C, S, K = theta.shape
    sd = cov.diag().sqrt()
    ess_mean = _ess(theta)
    se_mean = sd / ess_mean.sqrt()
    err = (theta.reshape(-1, K).mean(0) - mean).abs()
    assert (err < z * se_mean).all(), f"mean error {err} vs MC error {se_mean}"
    assert (se_mean < 0.15 * sd).all()  # enough draws that the check has teeth
    c = theta - mean
    for i in range(K):
        for j in range(i, K):
            prod = c[..., i] * c[..., j]
            ess = _ess(prod[..., None])[0]
            se = prod.std() / ess.sqrt()
            est = prod.mean()
            assert abs(est - cov[i, j]) < z * se, f"cov[{i},{j}] = {est:.4g} vs {cov[i, j]:.4g} (MC error {se:.2g})"


def _theta(post) -> torch.Tensor:
    w, b = post.samples["weight"], post.samples["bias"]
    return torch.cat([w.reshape(w.shape[:2] + (-1,)), b.reshape(b.shape[:2] + (-1,))], -1)


@pytest.mark.parametrize("method", ["nuts", "hmc"])
def test_conjugate_linear_regression(conjugate, method):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1), pbnn.priors.Normal(0.0, c["alpha"]), pbnn.likelihoods.Gaussian(c["sigma"]))
    opts = {"num_leapfrog_steps": 8} if method == "hmc" else {}
    post = pbnn.fit(
        model, c["x"], c["y"], method=method, num_samples=250, warmup=200, num_chains=6, seed=1, progress=False,
        init="net", warn=False, **opts,
    )  # fmt: skip
    assert post.samples["weight"].shape == (6, 250, 1, 2)
    check_moments(_theta(post), c["mean"], c["cov"])
    assert post.sample_stats["diverging"].sum() == 0


def test_correlated_gaussian_core():
    # Correlation 0.95 and scales 1 and 3: a diagonal metric cannot undo the correlation.
    cov = torch.tensor([[1.0, 0.95 * 3], [0.95 * 3, 9.0]], dtype=torch.double)
    prec = torch.linalg.inv(cov)
    fn = value_and_grad(lambda z: -0.5 * ((z @ prec) * z).sum(-1))
    out = sample_chains(
        "nuts",
        fn,
        torch.zeros(8, 2, dtype=torch.double),
        num_samples=300,
        warmup=200,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    check_moments(out.draws, torch.zeros(2), cov)


_COV = torch.tensor([[1.0, 0.95 * 3], [0.95 * 3, 9.0]])
_PREC = torch.linalg.inv(_COV)


def _correlated(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z @ _PREC) * z).sum(-1)


def test_compiled_sampler_matches_eager_and_target():
    # torch.compile fuses the leaf (leapfrog + gradient + checkpoint bookkeeping): same
    # algorithm, so from the same generator the first draws agree with the eager sampler to
    # float rounding, and a longer compiled run gets the correlated Gaussian's moments.
    cov, log_density = _COV, _correlated  # shared with the compile="auto" test: compiled once
    compiled_target = value_and_grad(log_density, compile=True)  # compiled once, used twice
    runs = {}
    for fn in (value_and_grad(log_density), compiled_target):
        runs[fn.compile] = sample_chains(
            "nuts", fn, torch.zeros(8, 2), num_samples=3, warmup=3, generator=torch.Generator().manual_seed(0),
            progress=False,
        )  # fmt: skip
    torch.testing.assert_close(runs[True].draws, runs[False].draws, rtol=1e-4, atol=1e-4)
    out = sample_chains(
        "nuts", compiled_target, torch.zeros(8, 2), num_samples=300, warmup=200,
        generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    check_moments(out.draws, torch.zeros(2), cov)


def test_funnel_core():
    # A mild funnel: v ~ N(0, 1), x | v ~ N(0, exp(v)); marginally var(v) = 1, var(x) = E[e^v] = e^0.5.
    def log_density(z):
        v, x = z[:, 0], z[:, 1]
        return -0.5 * v**2 - 0.5 * x**2 * torch.exp(-v) - 0.5 * v

    out = sample_chains(
        "nuts",
        value_and_grad(log_density),
        torch.zeros(8, 2, dtype=torch.double),
        num_samples=400,
        warmup=200,
        target_accept=0.9,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    check_moments(out.draws, torch.zeros(2), torch.diag(torch.tensor([1.0, math.exp(0.5)])))


def _small_bnn(make_net):
    x = torch.linspace(-2, 2, 40)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    return pbnn.BNN(make_net(hidden=4), likelihood=pbnn.likelihoods.Gaussian(scale="learned")), x, y


def test_same_seed_same_draws_and_chains_differ(make_net):
    model, x, y = _small_bnn(make_net)
    opts = dict(num_samples=15, warmup=15, num_chains=2, map_steps=50, max_tree_depth=4, progress=False, warn=False)
    a = pbnn.fit(model, x, y, method="nuts", seed=3, **opts)
    b = pbnn.fit(model, x, y, method="nuts", seed=3, **opts)
    c = pbnn.fit(model, x, y, method="nuts", seed=4, **opts)
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k])
    assert not torch.equal(a.samples["0.weight"], c.samples["0.weight"])
    w = a.samples["0.weight"]
    assert not torch.allclose(w[0], w[1])
    assert set(a.samples) == {"0.weight", "0.bias", "2.weight", "2.bias", "sigma"}
    assert (a.samples["sigma"] > 0).all()


def test_warning_on_bad_run_and_sample_stats_in_arviz(make_net):
    model, x, y = _small_bnn(make_net)
    with pytest.warns(UserWarning, match=r"NUTS: the chains may not have converged: max R-hat"):
        post = pbnn.fit(
            model, x, y, method="nuts", num_samples=20, warmup=5, num_chains=2, init="net", init_jitter=1.0,
            max_tree_depth=3, seed=0, progress=False,
        )  # fmt: skip
    assert post.info["diagnostics"]["max_rhat"] > 1.01
    stats = post.to_arviz().sample_stats
    for name in ("diverging", "acceptance_rate", "step_size", "tree_depth", "n_steps"):
        assert stats[name].shape == (2, 20)
    assert (post.sample_stats["n_steps"] <= 2**3).all()
    assert ((post.sample_stats["acceptance_rate"] >= 0) & (post.sample_stats["acceptance_rate"] <= 1)).all()


def test_full_batch_only(make_net):
    model, x, y = _small_bnn(make_net)
    for method in ("nuts", "hmc"):
        with pytest.raises(ValueError, match="sgld"):
            pbnn.fit(model, x, y, method=method, batch_size=16)
    with pytest.raises(ValueError, match="target_accept"):
        pbnn.infer.NUTS(target_accept=1.5)
    with pytest.raises(ValueError, match="init"):
        pbnn.infer.HMC(init="zeros")


def test_pyro_model_through_pyro_nuts(conjugate):
    c = conjugate

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, c["alpha"]).expand([2]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, c["alpha"]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w + b, c["sigma"]), obs=y)

    post = pbnn.fit(model, c["x"], c["y"], method="nuts", num_samples=150, warmup=100, num_chains=1, seed=0,
                    progress=False, warn=False)  # fmt: skip
    assert post.samples["w"].shape == (1, 150, 2)
    assert post.sample_stats["diverging"].shape == (1, 150)
    # Loose: 150 draws; the posterior sd is ~0.07, so 0.1 still catches a wrong model.
    assert (post.samples["w"].mean((0, 1)) - c["mean"][:2]).abs().max() < 0.1


def test_init_dict_starts_there(make_net):
    model, x, y = _small_bnn(make_net)
    start = {"sigma": torch.tensor(0.3)}
    post = pbnn.fit(model, x, y, method="hmc", init=start, init_jitter=0.0, num_samples=2, warmup=0,
                    num_leapfrog_steps=1, step_size=1e-4, adapt_step_size=False, num_chains=1, progress=False,
                    warn=False)  # fmt: skip
    # One leapfrog step of size 1e-4 cannot move sigma far from where the chain started.
    assert abs(float(post.samples["sigma"][0, 0]) - 0.3) < 0.01
    with pytest.raises(ValueError, match="unknown sites"):
        pbnn.fit(model, x, y, method="nuts", init={"bogus": torch.zeros(1)}, progress=False)


def test_old_option_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match="num_steps= is now num_leapfrog_steps="):
        assert pbnn.infer.HMC(num_steps=7).num_leapfrog_steps == 7
    with pytest.warns(DeprecationWarning, match="thin= is now thinning="):
        assert pbnn.infer.make_backend("mh", thin=3).thinning == 3
    with pytest.warns(DeprecationWarning, match="init_scale= is now proposal_scale="):
        assert pbnn.infer.MH(init_scale=0.2).proposal_scale == 0.2
    with pytest.warns(DeprecationWarning, match="step_size= is now lr="):
        assert pbnn.infer.make_backend("csghmc", step_size=0.01).lr == 0.01


# ---------------------------------------------------------------------------- compile="auto" and tree depth
def test_compile_pays_exactly_when_the_rest_of_the_run_repays_it():
    # remaining eager seconds * (1 - 1 / speedup) against the compile seconds
    assert compile_pays(31.0, compile_seconds=20.0, speedup=3.0)
    assert not compile_pays(29.0, compile_seconds=20.0, speedup=3.0)
    assert not compile_pays(1e9, compile_seconds=math.inf, speedup=3.0)  # compilation failed before
    assert not compile_pays(1e9, compile_seconds=0.0, speedup=1.0)  # compiled is no faster


class _FakeTarget:
    compile, trace = False, True


def _simulated_seconds(total: int, eager: float, speedup: float, compile_seconds: float) -> float:
    """Wall time of a run of ``total`` iterations under AutoCompile whose cost estimates are
    right (as after a first measurement), costs simulated exactly."""
    target, key = _FakeTarget(), ("simulated", total, eager, speedup, compile_seconds)
    chains_module._MEASURED[key] = (compile_seconds, speedup)
    auto = AutoCompile(target, key, total)
    wall, first = 0.0, True
    for it in range(total):
        seconds = eager
        if target.compile:
            seconds, first = eager / speedup + (compile_seconds if first else 0.0), False
        wall += seconds
        auto.update(it, seconds, {})
    del chains_module._MEASURED[key]
    return wall


@pytest.mark.parametrize("eager, speedup, compile_seconds", [(0.4, 3.0, 20.0), (0.4, 10.0, 20.0), (0.05, 5.0, 1.0)])
def test_auto_compile_never_makes_a_shorter_run_slower(eager, speedup, compile_seconds):
    # The wall time of a run grows with its length, and a long run compiles (it ends well
    # below the all-eager time).
    walls = [_simulated_seconds(n, eager, speedup, compile_seconds) for n in range(1, 600, 7)]
    assert all(b >= a for a, b in zip(walls, walls[1:]))
    assert walls[-1] < 0.7 * eager * 596


def test_auto_compile_uses_costs_measured_in_this_process():
    # A 4000-iteration run at 0.1 s per eager iteration compiles after its first (the default
    # estimates), measures compile cost and speedup; a graph torch.compile keeps (not traced)
    # is then assumed cached, so a later 30-iteration run compiles at its first check too.
    for trace, want_cost in ((True, 1.99), (False, CACHED_COMPILE_SECONDS)):
        key = ("measured", trace)
        target = _FakeTarget()
        target.trace = trace
        auto = AutoCompile(target, key, total=4000)
        assert auto.update(0, 0.1, {}) and target.compile
        for it, seconds in enumerate([2.0] + [0.01] * 5, start=1):  # compilation, then compiled
            auto.update(it, seconds, {})
        cost, speedup = chains_module._MEASURED.pop(key)
        assert cost == pytest.approx(want_cost) and speedup == pytest.approx(10.0)
    short = _FakeTarget()
    assert not AutoCompile(short, ("fresh",), total=30).update(0, 0.1, {}) and not short.compile
    chains_module._MEASURED[("cached",)] = (CACHED_COMPILE_SECONDS, 10.0)
    assert AutoCompile(short, ("cached",), total=30).update(0, 0.1, {}) and short.compile
    del chains_module._MEASURED[("cached",)]


def test_auto_compile_switches_mid_run_to_the_compiled_sampler(monkeypatch):
    # Forced to switch after iteration 1 (measured: free compile, 1000x faster), a run's first
    # draws agree with the eager run's to float rounding, as for compile=True.
    monkeypatch.setitem(chains_module._MEASURED, ("nuts", 10, 20, "auto-test"), (0.0, 1000.0))
    runs = {}
    for key in (None, ("auto-test",)):
        target = value_and_grad(_correlated)
        runs[key] = sample_chains(
            "nuts", target, torch.zeros(8, 2), num_samples=3, warmup=3, generator=torch.Generator().manual_seed(0),
            progress=False, compile_key=key,
        )  # fmt: skip
        assert target.compile == (key is not None)
    torch.testing.assert_close(runs[("auto-test",)].draws, runs[None].draws, rtol=1e-4, atol=1e-4)


def test_warns_when_most_trees_hit_max_tree_depth():
    # A fixed tiny step size: no trajectory of 2**3 steps reaches a U-turn.
    out = sample_chains(
        "nuts", value_and_grad(lambda z: -0.5 * (z**2).sum(-1)), torch.ones(2, 2), num_samples=10, warmup=0,
        step_size=1e-3, adapt_step_size=False, max_tree_depth=3, generator=torch.Generator().manual_seed(0),
        progress=False,
    )  # fmt: skip
    assert (out.stats["tree_depth"] == 3).all()
    with pytest.warns(FitWarning, match=r"100% of the transitions hit max_tree_depth=3.*raise max_tree_depth"):
        assert tree_depth_warning(out.stats["tree_depth"], 3) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tree_depth_warning(torch.tensor([[3, 2, 2]]), 3) == pytest.approx(1 / 3)


def test_fit_warns_on_max_tree_depth(make_net):
    model, x, y = _small_bnn(make_net)
    with pytest.warns(FitWarning, match="max_tree_depth=1"):
        pbnn.fit(model, x, y, method="nuts", num_samples=5, warmup=5, num_chains=1, max_tree_depth=1,
                 init="net", seed=0, progress=False)  # fmt: skip


def test_traced_pyro_density_matches_the_model(conjugate):
    # compile for a Pyro model records one chain's log density as a graph of tensor ops and
    # vmaps it over chains: the same values and gradients as the model, at other points too.
    c = conjugate

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(1.0))  # a constrained site: the Jacobian is in the graph
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, s), obs=y)

    pot = pbnn.potential.Potential(model, pbnn.data.validate(model, c["x"], c["y"]))
    density = lambda z: pot.log_joint_batch(z, None, pot.fixed)  # noqa: E731
    z = torch.randn(3, pot.dim, generator=torch.Generator().manual_seed(0))
    other = z + torch.tensor([0.3, -0.2, 0.1])
    with pyro.validation_enabled(False):  # as in pbnn's samplers (Pyro's NaN checks read values)
        traced = hmc._trace_density(density, z, ())
        torch.testing.assert_close(traced(other), density(other))
        g_model = value_and_grad(density)(other)[1]
        g_traced = value_and_grad(traced)(other)[1]
    torch.testing.assert_close(g_traced, g_model)


def test_trace_falls_back_to_eager_on_control_flow():
    def branchy(z):  # Python control flow on the value of z: one recorded path cannot serve it
        return -(z**2).sum(-1) if float(z.sum()) > 0 else -z.abs().sum(-1)

    target = value_and_grad(branchy, compile=True, trace=True)
    with pytest.warns(UserWarning, match="could not record the model's log density"):
        target.prepare(torch.ones(2, 3))
    assert not target.compile
    lp, g = target(torch.ones(2, 3))  # eager, correct
    torch.testing.assert_close(lp, torch.full((2,), -3.0))
