"""Local reparameterisation and flipout (pbnn.reparam, SVI(estimator=...))."""

import warnings

import pbnn.data
import pbnn.potential
import pytest
import torch
from torch.distributions import Independent, Normal

import pbnn
from pbnn.infer.reparam import negative_elbo, perturbed

ESTIMATORS = ["reparam", "local_reparam", "flipout"]


# ------------------------------------------------------------------ same posterior
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_all_estimators_reach_the_exact_mean_field_posterior(conjugate, estimator):
    """Conjugate Bayesian linear regression: the optimal mean-field Gaussian has the exact
    posterior mean and variances 1 / precision_ii, whichever gradient estimator is used."""
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
        method="svi",
        estimator=estimator,
        num_steps=2000,
        lr=0.02,
        num_particles=4,
        seed=0,
        progress=False,
    )
    q = post.approximation.q.base_dist  # flat latent order: weight (2), bias (1)
    sd = c["cov"].diag().sqrt()
    # Gradient noise at the final lr (2e-3 after the decay) leaves about 0.1 posterior sd at
    # most (seeds 0 and 1: 0.02 to 0.11); 0.25 sd still separates the posterior from the prior mean (0, > 2 sd
    # away) and from a fit stuck at the initial scale 1e-3 (the variances are checked to 20%).
    assert ((q.loc - c["mean"]).abs() / sd).max() < 0.25
    assert torch.allclose(q.scale, 1 / c["prec"].diag().sqrt(), rtol=0.2)
    assert post.info["estimator"] == estimator
    # Predictions draw whole weight samples, as for plain reparameterisation.
    assert post.predict(c["x"][:3], num_samples=10).samples.shape == (10, 3, 1)


# ------------------------------------------------------------------ unbiasedness of one layer
def _layers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=1)
    return [(lin, torch.randn(5, 4)), (conv, torch.randn(5, 2, 4, 4))]


def _analytic(layer, x, sd_w, sd_b):
    with torch.no_grad():
        mean = layer(x)
        if isinstance(layer, torch.nn.Linear):
            var = torch.nn.functional.linear(x**2, sd_w**2, sd_b**2)
        else:
            var = torch.nn.functional.conv2d(x**2, sd_w**2, sd_b**2, padding=1)
    return mean, var


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
@pytest.mark.parametrize("which", [0, 1], ids=["Linear", "Conv2d"])
def test_layer_output_mean_and_per_example_variance_match_the_weight_posterior(estimator, which):
    layer, x = _layers()[which]
    g = torch.Generator().manual_seed(1)
    sd_w = 0.2 + 0.5 * torch.rand(layer.weight.shape, generator=g)
    sd_b = 0.2 + 0.5 * torch.rand(layer.bias.shape, generator=g)
    mean, var = _analytic(layer, x, sd_w, sd_b)
    torch.manual_seed(2)
    k, r = 1000, 10  # k weight-noise draws, each on a batch holding every example r times
    outs = []
    with torch.no_grad():
        for _ in range(k):
            if estimator == "local_reparam":
                noise = {"weight": sd_w, "bias": sd_b}
            else:  # flipout perturbs with one draw W - mu shared by the batch
                noise = {"weight": sd_w * torch.randn_like(sd_w), "bias": sd_b * torch.randn_like(sd_b)}
            with perturbed(layer, estimator, noise):
                outs.append(layer(x.repeat(r, *[1] * (x.dim() - 1))).unflatten(0, (r, x.shape[0])))
    outs = torch.stack(outs)  # [k, r, examples, ...]
    flat = outs.flatten(0, 1)
    # Each output is Gaussian with the analytic moments. Local reparameterisation: all k * r
    # draws independent. Flipout: the r copies share W - mu but E[output | W - mu] is the mean
    # exactly (random signs), so the mean still has standard error sqrt(var / (k r)); its
    # sample variance also carries the spread of the conditional variance over the k draws
    # (at most ~4% here). Mean: 4.5 standard errors over at most 240 entries; variance: 12%.
    se = (var / (k * r)).sqrt()
    assert ((flat.mean(0) - mean).abs() / se).max() < 4.5
    assert torch.allclose(flat.var(0), var, rtol=0.12)
    # Per-example independence: two copies of the same input in one batch get uncorrelated
    # noise (shared weight noise, i.e. plain reparameterisation, gives correlation 1). The
    # product of their noises has mean 0: within 4.5 of its standard errors (240 entries at
    # most; flipout's products are heavier-tailed than Gaussian ones, so use their own spread).
    prod = ((outs[:, 0] - mean) * (outs[:, 1] - mean)).flatten(1)
    assert (prod.mean(0) / (prod.std(0) / k**0.5)).abs().max() < 4.5
    assert (prod.mean(0) / var.flatten()).abs().max() < 0.25  # correlation, far from 1


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
@pytest.mark.parametrize("which", [0, 1], ids=["Linear", "Conv2d"])
def test_identical_inputs_in_one_batch_get_different_outputs(estimator, which):
    layer, x = _layers()[which]
    x = x[:1].expand(2, *x.shape[1:])
    noise = {"weight": 0.3 * torch.randn_like(layer.weight)}
    noise["weight"] = noise["weight"] if estimator == "flipout" else noise["weight"].abs()
    with torch.no_grad(), perturbed(layer, estimator, noise):
        y = layer(x)
    assert not torch.allclose(y[0], y[1])
    assert not layer._forward_hooks  # hooks are gone after the block


# ------------------------------------------------------------------ the whole ELBO estimate
def test_elbo_estimates_agree_in_expectation():
    """At fixed guide parameters the three estimators estimate the same ELBO (an MLP with
    2-D inputs, where local reparameterisation is exact too), within Monte Carlo error."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    model = pbnn.BNN(net)  # learned noise scale: one non-weight site, sampled from z
    x = torch.randn(20, 2)
    data = pbnn.data.validate(model, x, torch.sin(x[:, 0]))
    pot = pbnn.potential.Potential(model, data)
    loc = pot.initial_z() + 0.1 * torch.randn(pot.dim)
    q = Independent(Normal(loc, 0.3 * torch.ones(pot.dim)), 1)

    def plain(idx):
        z = q.rsample((1,))
        return -(pot.log_joint_batch(z, idx) - q.log_prob(z)).mean()

    m = 1000
    stats = {}
    with torch.no_grad():
        for name in ESTIMATORS:
            loss = plain if name == "reparam" else negative_elbo(pot, lambda: q, {}, name)
            v = torch.stack([loss(None) for _ in range(m)])
            stats[name] = (v.mean(), v.std() / m**0.5)
    mu0, se0 = stats["reparam"]
    for name in ("local_reparam", "flipout"):
        mu, se = stats[name]
        assert (mu - mu0).abs() < 4 * (se**2 + se0**2).sqrt(), (name, mu, mu0, se, se0)
    # Local reparameterisation lowers the spread of the estimate itself.
    assert stats["local_reparam"][1] < stats["reparam"][1]


# ------------------------------------------------------------------ fallbacks and errors
def test_unsupported_layers_fall_back_with_a_warning_naming_them():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(30, 2)
    with pytest.warns(UserWarning, match=r"'1' \(LayerNorm\)") as rec:
        post = pbnn.fit(
            pbnn.BNN(net), x, x[:, 0], method="svi", estimator="flipout", num_steps=20, num_samples=5, progress=False
        )
    assert sum("fall back" in str(w.message) for w in rec) == 1  # once per fit, not per step
    assert "'0'" not in str(rec[0].message)
    assert set(post.samples) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "sigma"}


def test_supported_nets_fit_without_warning_and_leave_no_hooks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(24, 1)
    )
    # one deterministic parameter; hierarchical prior scales stay plainly reparameterised
    model = pbnn.BNN(net, prior=pbnn.priors.HierarchicalNormal(), bayesian=lambda n: n != "3.bias")
    x = torch.randn(16, 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for est in ("local_reparam", "flipout"):
            post = pbnn.fit(model, x, x[:, 0, 0], method="svi", estimator=est, num_steps=30, progress=False, seed=0)
            assert torch.isfinite(torch.tensor(post.info["losses"])).all()
            assert "3.bias" in post.fixed
    assert not any(m._forward_hooks for m in model.net.modules())


def test_shared_layer_is_refused():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="more than once"):
        pbnn.fit(pbnn.BNN(Tied()), x, x, method="svi", estimator="local_reparam", num_steps=2, progress=False)


def test_bad_estimator_options():
    with pytest.raises(ValueError, match="mean-field"):
        pbnn.infer.SVI(guide="full_rank", estimator="local_reparam")
    with pytest.raises(ValueError, match="mean-field"):
        pbnn.infer.SVI(guide="low_rank", estimator="flipout")
    with pytest.raises(ValueError, match="unknown estimator"):
        pbnn.infer.SVI(estimator="lrt")

    def pyro_model(x, y=None):
        import pyro
        import pyro.distributions as dist

        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(w * x[:, 0], 1.0), obs=y)

    x = torch.randn(5, 1)
    with pytest.raises(ValueError, match="pbnn.BNN"):
        pbnn.fit(pyro_model, x, x[:, 0], method="svi", estimator="flipout", num_steps=2, progress=False)


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
def test_conv2d_covariance_across_positions_of_one_example(estimator):
    """Weight sampling makes two output positions of one example covary through the shared kernel:
    ``Cov(y_t, y_u) = sum_k P_tk P_uk sd_k^2 + sd_b^2`` (``P`` the unfolded patches). Flipout keeps it
    (one sign per example and channel, so the per-example output is the weight-sampled one in
    distribution); local reparameterisation samples every position independently (covariance 0),
    the documented approximation of ``docs/svi.md``."""
    layer, x = _layers()[1]
    x = x[:1]
    g = torch.Generator().manual_seed(3)
    sd_w = 0.2 + 0.5 * torch.rand(layer.weight.shape, generator=g)
    sd_b = 0.2 + 0.5 * torch.rand(layer.bias.shape, generator=g)
    patches = torch.nn.functional.unfold(x, 3, padding=1)[0].T  # [T, K]
    cov = torch.einsum("tk,ck,uk->ctu", patches, sd_w.flatten(1) ** 2, patches) + (sd_b**2)[:, None, None]
    torch.manual_seed(4)
    k = 4000
    with torch.no_grad():
        outs = []
        for _ in range(k):
            noise = {"weight": sd_w, "bias": sd_b}
            if estimator == "flipout":
                noise = {n: s * torch.randn_like(s) for n, s in noise.items()}
            with perturbed(layer, estimator, noise):
                outs.append(layer(x)[0].flatten(1))  # [C, T]
        dev = torch.stack(outs) - layer(x)[0].flatten(1)
    emp = torch.einsum("sct,scu->ctu", dev, dev) / k
    # standard error of a Gaussian covariance estimate: sqrt((var_t var_u + cov^2) / k); 5 of them
    var = cov.diagonal(dim1=1, dim2=2)
    se = ((var[:, :, None] * var[:, None, :] + cov**2) / k).sqrt()
    expected = cov if estimator == "flipout" else torch.diag_embed(var)
    assert ((emp - expected).abs() / se).max() < 5
    # and the difference is not small: neighbouring positions correlate under weight sampling
    assert (cov[:, 0, 1] / var[:, 0]).min() > 0.2
