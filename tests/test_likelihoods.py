import math

import pytest
import torch

import pbnn


def test_gaussian_fixed_and_learned():
    f = torch.tensor([[0.0], [1.0]])
    d = pbnn.likelihoods.Gaussian(0.5).conditional(f, {})
    expected = torch.distributions.Normal(torch.tensor([0.0, 1.0]), 0.5).log_prob(torch.tensor([0.2, 0.2]))
    assert torch.allclose(d.log_prob(torch.tensor([0.2, 0.2])), expected)
    lik = pbnn.likelihoods.Gaussian("learned")
    d = lik.conditional(torch.zeros(3, 4, 1), {"sigma": torch.tensor([1.0, 2.0, 3.0])})  # 3 draws
    assert torch.allclose(d.stddev[:, 0], torch.tensor([1.0, 2.0, 3.0]))


def test_multitask_gaussian_is_kendall_uncertainty_weighted_loss():
    """-log p = sum_t [ (y_t - f_t)^2 / (2 sigma_t^2) + log sigma_t ] + T/2 log(2 pi)."""
    f, y = torch.randn(5, 3), torch.randn(5, 3)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    nll = -pbnn.likelihoods.MultiTaskGaussian().conditional(f, {"sigma": sigma}).log_prob(y)
    kendall = ((y - f) ** 2 / (2 * sigma**2) + sigma.log()).sum(-1) + 1.5 * math.log(2 * math.pi)
    assert torch.allclose(nll, kendall, atol=1e-5)


def test_heteroscedastic_uses_second_half_as_log_scale():
    f = torch.tensor([[1.0, math.log(2.0)]])
    d = pbnn.likelihoods.HeteroscedasticGaussian().conditional(f, {})
    assert d.mean.item() == pytest.approx(1.0) and d.stddev.item() == pytest.approx(2.0, rel=1e-5)


def test_classification_likelihoods():
    f = torch.tensor([[0.0, math.log(3.0)]])
    assert torch.allclose(pbnn.likelihoods.Categorical().conditional(f, {}).probs, torch.tensor([[0.25, 0.75]]))
    b = pbnn.likelihoods.Bernoulli().conditional(torch.tensor([[0.0]]), {})
    assert b.log_prob(torch.tensor([1.0])).item() == pytest.approx(math.log(0.5))


def test_target_validation():
    with pytest.raises(ValueError, match="integer dtype"):
        pbnn.likelihoods.Categorical().validate_targets(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pbnn.likelihoods.Categorical().validate_targets(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="shape"):
        pbnn.likelihoods.Gaussian().validate_targets(torch.zeros(4, 2), 1)
    assert pbnn.likelihoods.Gaussian().validate_targets(torch.zeros(4, 1), 1).shape == (4,)
