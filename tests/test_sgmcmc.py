"""SG-MCMC: update rules, schedules, minibatch scaling, Gaussian / conjugate / mixture targets, Pyro MCMC."""

import io
import math
from contextlib import redirect_stdout

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.engine import chains
from pbnn.infer.sgmcmc import CyclicalSGLDKernel, SGHMCKernel, SGLDKernel
from pbnn.kernels.sgmcmc import (
    cycle_index,
    cyclical_cosine,
    is_exploration,
    polynomial_decay,
    psgld_step,
    sghmc_step,
    sgld_step,
)

# ---------------------------------------------------------------------------- schedules


def test_cyclical_cosine_is_the_papers_formula():
    # K = 1000 steps, M = 7 cycles: ceil(K / M) = 143 does not divide K, the case most likely to go wrong.
    K, M, a0 = 1000, 7, 0.3
    L = math.ceil(K / M)
    for k in range(1, K + 1):
        expected = a0 / 2 * (math.cos(math.pi * ((k - 1) % L) / L) + 1)
        assert cyclical_cosine(k, a0, K, M) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert is_exploration(k, K, M, 0.25) == (((k - 1) % L) / L < 0.25)
        assert cycle_index(k, K, M) == (k - 1) // L
    assert cyclical_cosine(1, a0, K, M) == a0 and cyclical_cosine(L + 1, a0, K, M) == a0  # restarts
    assert sum(is_exploration(k, K, M, 0.25) for k in range(1, L + 1)) == math.ceil(0.25 * L)


def test_polynomial_decay_is_a_b_plus_t_to_minus_gamma():
    for t in (0, 1, 10, 1234):
        assert polynomial_decay(t, 0.043, 1.0, 0.55) == pytest.approx(0.043 * (1.0 + t) ** -0.55, rel=1e-12)
    # the kernel's "polynomial" schedule starts at step_size and then decays as (1 + t / b)^-gamma
    k = SGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), 0.1, schedule="polynomial", decay_b=10.0, decay_gamma=0.6)
    assert k._schedule(1) == pytest.approx(0.1)
    assert k._schedule(11) == pytest.approx(0.1 * 2**-0.6)


# ---------------------------------------------------------------------------- update rules


def test_update_rules_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    x, grad, xi, m = (torch.randn(5, generator=g) for _ in range(4))
    lr, n, T = 0.01, 50, 0.7
    assert torch.allclose(sgld_step(x, grad, lr, n, T, xi), x - lr * grad + math.sqrt(2 * lr * T / n) * xi)
    assert torch.equal(sgld_step(x, grad, lr, n, T, None), x - lr * grad)  # exploration: no noise
    a = 0.3
    pos, mom = sghmc_step(x, m, grad, lr, n, a, T, xi)
    m_new = (1 - a) * m - lr * grad + math.sqrt(2 * lr * a * T / n) * xi
    assert torch.allclose(mom, m_new) and torch.allclose(pos, x + m_new)
    # friction a = 1 is SGLD exactly
    assert torch.allclose(sghmc_step(x, m, grad, lr, n, 1.0, T, xi)[0], sgld_step(x, grad, lr, n, T, xi))
    v = torch.rand(5, generator=g)
    pos, v_new = psgld_step(x, v, grad, lr, n, T, xi, alpha=0.9, eps=1e-3)
    v_ref = 0.9 * v + 0.1 * grad**2
    G = 1 / (1e-3 + v_ref.sqrt())
    assert torch.allclose(v_new, v_ref)
    assert torch.allclose(pos, x - lr * G * grad + (2 * lr * T * G / n).sqrt() * xi)


# ---------------------------------------------------------------------------- Gaussian target


def _gaussian_kl(m1, S1, m0, S0):
    """KL(N(m1, S1) || N(m0, S0))."""
    S0inv = torch.linalg.inv(S0)
    d = m0 - m1
    return 0.5 * (torch.trace(S0inv @ S1) + d @ S0inv @ d - len(m0) + torch.logdet(S0) - torch.logdet(S1))


@pytest.mark.parametrize("rule", ["sgld", "sghmc", "psgld"])
def test_gaussian_target_moments_and_kl(rule):
    """posteriors-style check: 2000 independent chains on a correlated 2-D Gaussian (precision
    eigenvalues 2 and 0.67) with gradient noise N(0, I), started 3-6 sd away.

    Bias: for SGLD the stationary variance along a precision eigenvalue lambda is
    (1 + lr s^2 / 2) / (lambda (1 - lr lambda / 2)): at most +4.7% here (lr = 0.03); SGHMC and
    pSGLD move at a similar effective rate. Monte Carlo error from 2000 independent draws: a
    variance ratio has sd sqrt(2 / 2000) ~ 3.2%, a mean sd / sqrt(2000) ~ 0.022 sd.
    Tolerances: 4 standard errors plus the bias (variances 0.18, means 0.1 sd). The initial
    distance decays as exp(-0.02 t): below 0.002 sd after 400 steps.
    """
    g = torch.Generator().manual_seed(1)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    chains, steps, s_noise = 2000, 400, 1.0
    start = torch.tensor([4.0, 2.0], dtype=torch.float64)
    x = start.expand(chains, 2).clone()  # far from the target: the initial KL is large
    lr = {"sgld": 0.03, "sghmc": 3e-3, "psgld": 0.04}[rule]
    state = torch.zeros_like(x)
    for _ in range(steps):
        grad = (x - mean) @ prec + s_noise * torch.randn(x.shape, generator=g, dtype=x.dtype)  # -grad log p + noise
        xi = torch.randn(x.shape, generator=g, dtype=x.dtype)
        if rule == "sgld":
            x = sgld_step(x, grad, lr, 1, 1.0, xi)
        elif rule == "sghmc":
            x, state = sghmc_step(x, state, grad, lr, 1, 0.1, 1.0, xi)
        else:
            x, state = psgld_step(x, state, grad, lr, 1, 1.0, xi)
    m_hat, S_hat = x.mean(0), torch.cov(x.T)
    sd = cov.diagonal().sqrt()
    assert ((m_hat - mean).abs() / sd < 0.1).all(), m_hat
    assert torch.allclose(S_hat.diagonal() / cov.diagonal(), torch.ones(2, dtype=x.dtype), atol=0.18), S_hat
    kl_init = _gaussian_kl(start, cov, mean, cov)
    kl = _gaussian_kl(m_hat, S_hat, mean, cov)
    assert kl < 0.02 and kl < kl_init / 1000, (float(kl), float(kl_init))


# ---------------------------------------------------------------------------- 25-Gaussian mixture


def _mog25_grad(x, centres, var):
    """-grad log p of the equal-weight mixture of N(c, var I): softmax-weighted pulls to the centres."""
    d = x[None, :] - centres  # [25, 2]
    w = torch.softmax(-0.5 * (d * d).sum(1) / var, 0)
    return (w[:, None] * d).sum(0) / var


def test_cyclical_sgld_visits_more_modes_of_the_25_gaussian_mixture():
    """Zhang et al. (2020), Fig. 2 set-up, scaled down: same gradient budget for both samplers,
    gradient noise N(0, I), start uniform in [-10, 10]^2. cSGLD restarts its step size each
    cycle and hops between modes; SGLD with a decaying step size settles in a few."""
    grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    centres = torch.cartesian_prod(grid, grid)
    var, steps, cycles = 0.03, 20000, 12
    g = torch.Generator().manual_seed(0)
    x0 = -10 + 20 * torch.rand(2, generator=g, dtype=torch.float64)

    def run(cyclical):
        x, kept = x0.clone(), []
        for t in range(1, steps + 1):
            grad = _mog25_grad(x, centres, var) + torch.randn(2, generator=g, dtype=torch.float64)
            xi = torch.randn(2, generator=g, dtype=torch.float64)
            if cyclical:
                lr = cyclical_cosine(t, 0.07, steps, cycles)
                explore = is_exploration(t, steps, cycles, 0.03)
                x = sgld_step(x, grad, lr, 1, 1.0, None if explore else xi)
                if not explore:
                    kept.append(x)
            else:  # the paper's baseline: 0.043 for 500 steps, then 0.043 (t - 500)^-0.55
                lr = 0.043 if t <= 500 else polynomial_decay(t - 500, 0.043, 0.0, 0.55)
                x = sgld_step(x, grad, lr, 1, 1.0, xi)
                kept.append(x)
        kept = torch.stack(kept)
        dist_to_centre = torch.cdist(kept, centres)  # [S, 25]
        return int((dist_to_centre.min(0).values < 0.5).sum())  # 0.5 ~ 3 sd of a component

    modes_csgld, modes_sgld = run(True), run(False)
    assert modes_csgld >= 20, modes_csgld
    assert modes_sgld <= modes_csgld - 8, (modes_sgld, modes_csgld)


# ---------------------------------------------------------------------------- minibatch scaling


def hand_written(x, y=None, subsample=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(x[i] @ w, s), obs=None if y is None else y[i])


@pytest.mark.parametrize("kind", ["bnn", "pyro"])
def test_minibatch_gradient_is_scaled_by_n_over_b(kind, conjugate):
    """Batch = N gives the full gradient exactly; the mean over one epoch of B-sized minibatch
    gradients (B divides N, each point seen once) equals the full gradient exactly."""
    x, y = conjugate["x"], conjugate["y"]
    model = pbnn.BNN(torch.nn.Linear(2, 1)) if kind == "bnn" else hand_written
    full = SGLDKernel(model, 1e-3, batch_size=len(x), seed=0)
    full.setup(0, x, y)
    z = full._z + 0.1
    g_full = full._grad(z)
    mini = SGLDKernel(model, 1e-3, batch_size=10, seed=0)
    mini.setup(0, x, y)
    grads = torch.stack([mini._grad(z) for _ in range(len(x) // 10)])
    assert torch.allclose(grads.mean(0), g_full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grads[0], g_full, atol=1e-3)  # a single minibatch is noisy
    # and the full gradient is the true per-datum gradient of -log p (autograd on the Pyro model / Potential)
    z2 = z.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(-full.potential.log_joint(z2, None) / len(x), z2)
    assert torch.allclose(g_full, g_ref)


# ---------------------------------------------------------------------------- conjugate regression


@pytest.mark.parametrize(
    "method, options, var_bounds",
    [
        # full batch, lr * lambda_max ~ 0.1 (per-datum curvature ~ 4-5): variance bias
        # 1 / (1 - lr lambda / 2) <= 5%; relaxation time ~ 1 / (lr lambda) ~ 12 steps
        # (x thinning 4 x 1500 draws = 6000 steps) give ESS ~ 250, so a variance ratio has Monte Carlo sd ~ 9%.
        ("sgld", {"lr": 0.02}, (0.6, 1.5)),
        # minibatches of 10: the minibatch noise adds variance lr^2 Var(grad) per step, about
        # lr * N * Var(grad) / 2 ~ 0.5-1x the injected noise here: "right order" = within [0.6, 2.5].
        ("sgld", {"lr": 0.02, "batch_size": 10}, (0.6, 2.5)),
        ("sghmc", {"lr": 0.004, "friction": 0.2}, (0.6, 1.5)),
        ("psgld", {"lr": 0.005}, (0.5, 1.6)),
    ],
)
def test_conjugate_linear_regression(conjugate, method, options, var_bounds):
    c = conjugate
    model = pbnn.BNN(
        torch.nn.Linear(2, 1),
        prior=pbnn.priors.Normal(0.0, c["alpha"]),
        likelihood=pbnn.likelihoods.Gaussian(c["sigma"]),
    )
    post = pbnn.fit(
        model,
        c["x"],
        c["y"],
        method=method,
        num_samples=1500,
        warmup=200,
        thinning=4,
        seed=0,
        progress=False,
        **options,
    )
    theta = torch.cat([post.samples["weight"].reshape(-1, 2), post.samples["bias"].reshape(-1, 1)], 1)
    sd = c["cov"].diagonal().sqrt()
    # mean: Monte Carlo error ~ sd / sqrt(ESS ~ 250) ~ 0.06 sd; tolerance 0.35 sd (~4 standard errors)
    assert ((theta.mean(0) - c["mean"]).abs() / sd < 0.35).all(), (theta.mean(0), c["mean"])
    ratio = theta.var(0) / c["cov"].diagonal()
    assert ((ratio > var_bounds[0]) & (ratio < var_bounds[1])).all(), ratio
    assert post.sample_stats["step_size"].shape == (1, 1500)
    assert "acceptance_rate" not in post.sample_stats


# ---------------------------------------------------------------------------- Pyro's MCMC drives the kernels


def test_pyro_mcmc_drives_the_kernel_with_summary_and_hook(conjugate):
    c = conjugate
    calls = []
    kernel = SGHMCKernel(hand_written, 0.002, friction=0.2, batch_size=25, thinning=2, seed=0)
    mcmc = pyro.infer.MCMC(
        kernel, num_samples=300, warmup_steps=100, hook_fn=lambda *a: calls.append(a[2]), disable_progbar=True
    )
    mcmc.run(c["x"], c["y"])
    assert len(calls) == 400 and calls[0] == "Warmup" and calls[-1] == "Sample"
    assert kernel._step == 800  # thinning 2 gradient steps per transition
    samples = mcmc.get_samples()
    assert samples["w"].shape == (300, 2) and (samples["s"] > 0).all()  # back in the constrained space
    assert torch.allclose(samples["w"].mean(0), c["mean"][:2], atol=0.2)
    assert samples["s"].mean().item() == pytest.approx(c["sigma"], abs=0.15)
    out = io.StringIO()
    with redirect_stdout(out):
        mcmc.summary()
    assert "w[0]" in out.getvalue() and "n_eff" in out.getvalue()
    assert mcmc.diagnostics()["gradient_steps"] == {"chain 0": 800}


def test_cyclical_kernel_keeps_draws_from_sampling_stages_only(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(c["sigma"]))
    post = pbnn.fit(
        model, c["x"], c["y"], method="csgld", num_samples=60, num_cycles=3, exploration=0.5, thinning=3,
        lr=0.02, seed=0, progress=False,
    )  # fmt: skip
    cycles = post.sample_stats["cycle"][0]
    assert torch.equal(torch.bincount(cycles), torch.tensor([20, 20, 20]))
    # a draw made in the second half of a cycle has lr <= alpha_0 / 2 (cos(pi beta) + 1) = alpha_0 / 2
    lrs = post.sample_stats["step_size"][0]
    assert (lrs <= 0.01 + 1e-12).all() and (lrs > 0).all()
    # the last draw of every cycle is made at the cycle's last step, where lr is smallest
    per_cycle = lrs.reshape(3, 20)
    assert (per_cycle[:, -1] == per_cycle.min(1).values).all()
    idata = post.to_arviz()
    assert "cycle" in idata.sample_stats and "step_size" in idata.sample_stats


def test_cyclical_kernel_under_pyro_mcmc(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(c["sigma"]))
    kernel = CyclicalSGLDKernel(model, 0.02, cycle_length=100, num_cycles=2, exploration=0.5, thinning=10, seed=0)
    mcmc = pyro.infer.MCMC(kernel, num_samples=10, warmup_steps=0, disable_progbar=True)
    mcmc.run(c["x"], c["y"])
    # 5 draws per sampling stage (steps 51..100 of each cycle, every 10th counted back from its end)
    assert kernel._step == 200 and kernel.stats["cycle"] == [0] * 5 + [1] * 5


# ---------------------------------------------------------------------------- MAP warm start


def known_noise(x, y=None, subsample=None):
    """The conjugate fixture's model, hand-written: theta = (w, b) ~ N(0, 1), sigma = 0.5."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(x[i] @ w + b, 0.5), obs=None if y is None else y[i])


@pytest.mark.parametrize("kind", ["bnn", "pyro"])
def test_map_warm_start_reaches_the_conjugate_posterior_mode(kind, conjugate):
    c = conjugate
    if kind == "bnn":
        model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(c["sigma"]))
    else:
        model = known_noise
    data = pbnn.data.validate(model, c["x"], c["y"])
    pot = pbnn.potential.Potential(model, data)
    z = pbnn.engine.chains.warm_start(pot, pbnn.engine.chains.chain_start(pot, 0), num_steps=3000)
    end = pot.layout.constrain(z)
    w, b = (end["weight"].reshape(-1), end["bias"]) if kind == "bnn" else (end["w"], end["b"][None])
    theta = torch.cat([w, b])
    sd = c["cov"].diagonal().sqrt()
    # the Gaussian posterior's mode is its mean; the start is ~1 sd or more away
    assert ((theta - c["mean"]).abs() / sd < 0.02).all(), (theta, c["mean"])


def test_init_map_starts_the_chain_at_the_mode(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(c["sigma"]))
    kw = dict(num_samples=1, warmup=0, thinning=1, lr=1e-6, temperature=0.0, seed=0, progress=False)
    net_start = pbnn.fit(model, c["x"], c["y"], method="sgld", **kw)
    map_start = pbnn.fit(model, c["x"], c["y"], method="sgld", init="map", **kw)
    sd = c["cov"].diagonal().sqrt()

    def dist_to_mode(post):  # one tiny noise-free step from the start: the start itself
        theta = torch.cat([post.samples["weight"].reshape(-1), post.samples["bias"].reshape(-1)])
        return ((theta - c["mean"]).abs() / sd).max()

    assert dist_to_mode(map_start) < 0.02 and dist_to_mode(net_start) > 0.5
    # "auto" (the cyclical samplers' default) warm-starts a BNN without a learned noise scale only
    cyc = dict(kw, num_cycles=1, exploration=0.0)
    fixed_noise = pbnn.fit(model, c["x"], c["y"], method="csgld", **cyc)
    assert dist_to_mode(fixed_noise) < 0.02
    learned = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian("learned"))
    assert dist_to_mode(pbnn.fit(learned, c["x"], c["y"], method="csgld", **cyc)) > 0.5
    assert pbnn.infer.CyclicalSGLD().init == pbnn.infer.CyclicalSGHMC().init == "auto"
    assert pbnn.infer.SGLD().init == pbnn.infer.SGHMC().init == pbnn.infer.PSGLD().init == "net"


# ---------------------------------------------------------------------------- reproducibility and errors


def test_same_seed_same_draws(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1))
    kw = dict(num_samples=20, warmup=5, batch_size=10, progress=False)
    a = pbnn.fit(model, c["x"], c["y"], method="sgld", seed=7, **kw)
    b = pbnn.fit(model, c["x"], c["y"], method="sgld", seed=7, **kw)
    d = pbnn.fit(model, c["x"], c["y"], method="sgld", seed=8, **kw)
    assert torch.equal(a.samples["weight"], b.samples["weight"])
    assert not torch.equal(a.samples["weight"], d.samples["weight"])
    two = pbnn.fit(model, c["x"], c["y"], method="psgld", num_chains=2, seed=1, **kw)
    assert two.samples["weight"].shape == (2, 20, 1, 2)
    assert not torch.equal(two.samples["weight"][0], two.samples["weight"][1])


def test_compiled_gradient_gives_the_eager_chain(conjugate):
    # compile=True changes how the gradient is computed (one torch.compile'd graph), not the
    # chain: same seed, same minibatches and noise, draws equal to float rounding.
    c = conjugate
    model = pbnn.BNN(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)))
    kw = dict(num_samples=10, warmup=2, batch_size=16, seed=5, progress=False)
    eager = pbnn.fit(model, c["x"], c["y"], method="sghmc", compile=False, **kw)
    compiled = pbnn.fit(model, c["x"], c["y"], method="sghmc", compile=True, **kw)
    for k in eager.samples:
        torch.testing.assert_close(compiled.samples[k], eager.samples[k], rtol=1e-4, atol=1e-5)
    # compile="auto" switching to the compiled gradient after the first transition (forced: this
    # process "measured" a free compile, 1000x faster) gives the same chain too.
    potential = pbnn.potential.Potential(model, pbnn.data.validate(model, c["x"], c["y"]))
    key = ("sgmcmc", *chains.compile_key(potential), 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(chains._MEASURED, key, (0.0, 1000.0))
        switched = pbnn.fit(model, c["x"], c["y"], method="sghmc", compile="auto", **kw)
        assert chains._MEASURED[key] != (0.0, 1000.0)  # it compiled and measured the costs
    for k in eager.samples:
        torch.testing.assert_close(switched.samples[k], eager.samples[k], rtol=1e-4, atol=1e-5)


def test_divergence_names_the_step_and_stores_nothing(conjugate):
    c = conjugate
    model = pbnn.BNN(torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"gradient step \d+.*lower lr"):
        pbnn.fit(model, c["x"], c["y"] * 1e3, method="sgld", lr=10.0, num_samples=50, warmup=10, progress=False)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("sgld", {"lr": -1.0}, "lr"),
        ("sgld", {"thinning": 0}, "thinning"),
        ("sgld", {"temperature": -1.0}, "temperature"),
        ("sgld", {"schedule": "cosine"}, "schedule"),
        ("sghmc", {"friction": 0.0}, "friction"),
        ("csgld", {"exploration": 1.0}, "exploration"),
        ("csghmc", {"num_cycles": 0}, "num_cycles"),
        ("csgld", {"num_samples": 2, "num_cycles": 4}, "num_cycles"),
        ("sgld", {"init": "prior"}, "init"),
        ("csghmc", {"map_steps": 0}, "map_steps"),
    ],
)
def test_bad_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        pbnn.infer.make_backend(method, **options)


def test_minibatches_need_subsample_in_a_pyro_model(conjugate):
    def no_subsample(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)

    with pytest.raises(ValueError, match="subsample"):
        pbnn.fit(no_subsample, conjugate["x"], conjugate["y"], method="sgld", batch_size=10, progress=False)
