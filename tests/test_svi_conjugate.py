"""SVI against the closed-form posterior of Bayesian linear regression (see conftest)."""

import torch

import pbnn


def _model(c):
    return pbnn.BNN(
        torch.nn.Linear(2, 1),
        prior=pbnn.priors.Normal(0.0, c["alpha"]),
        likelihood=pbnn.likelihoods.Gaussian(c["sigma"]),
    )


def test_full_rank_svi_recovers_exact_mean_and_covariance(conjugate):
    c = conjugate
    post = pbnn.fit(
        _model(c),
        c["x"],
        c["y"],
        method="svi",
        guide="full_rank",
        num_steps=3000,
        lr=0.02,
        num_particles=4,
        seed=0,
        progress=False,
    )
    q = post.approximation.q  # flat latent order: weight (2), bias (1)
    sd = c["cov"].diag().sqrt()
    # Mean within 0.2 posterior sd, covariance within 15% (Frobenius): far tighter than the
    # prior (sd 1.0) or a mean-field fit (no correlation), loose enough for SGD noise.
    assert ((q.mean - c["mean"]).abs() / sd).max() < 0.2
    rel = torch.linalg.norm(q.covariance_matrix - c["cov"]) / torch.linalg.norm(c["cov"])
    assert rel < 0.15
    # Stored draws describe the same distribution.
    w = post.samples["weight"][0, :, 0, :]
    assert torch.allclose(w.mean(0), c["mean"][:2], atol=4 * float(sd.max()) / 1000**0.5 + 0.01)


def test_mean_field_svi_recovers_mean_and_the_mean_field_variances(conjugate):
    """For a Gaussian target the optimal mean-field Gaussian has the exact mean and
    variances 1 / precision_ii (smaller than the marginal variances)."""
    c = conjugate
    post = pbnn.fit(
        _model(c),
        c["x"],
        c["y"],
        method="svi",
        guide="mean_field",
        num_steps=3000,
        lr=0.02,
        num_particles=4,
        seed=0,
        progress=False,
    )
    q = post.approximation.q.base_dist
    sd = c["cov"].diag().sqrt()
    assert ((q.loc - c["mean"]).abs() / sd).max() < 0.2
    mf_sd = 1 / c["prec"].diag().sqrt()
    assert torch.allclose(q.scale, mf_sd, rtol=0.15)


def test_low_rank_and_minibatch_svi_recover_the_mean(conjugate):
    c = conjugate
    post = pbnn.fit(
        _model(c),
        c["x"],
        c["y"],
        method="svi",
        guide="low_rank",
        num_steps=3000,
        lr=0.02,
        batch_size=10,
        seed=1,
        progress=False,
    )
    sd = c["cov"].diag().sqrt()
    # Minibatch gradients add noise: allow 0.5 posterior sd.
    assert ((post.approximation.q.mean - c["mean"]).abs() / sd).max() < 0.5


def test_map_matches_ridge_solution(conjugate):
    c = conjugate
    post = pbnn.fit(_model(c), c["x"], c["y"], method="map", num_steps=2000, lr=0.05, seed=0, progress=False)
    theta = torch.cat([post.samples["weight"].flatten(), post.samples["bias"].flatten()])
    assert torch.allclose(theta, c["mean"], atol=2e-3)  # Gaussian posterior: mode = mean
    assert post.num_chains == 1 and post.num_draws == 1
