import pyro
import pytest
import torch
from pyro import poutine

import pbnn


def _latent(tr):
    return [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not poutine.util.site_is_subsample(s)
    ]


def test_site_names_are_parameter_names_and_net_is_not_mutated(make_net):
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = pbnn.BNN(net)
    tr = poutine.trace(model).get_trace(torch.randn(5, 1), torch.randn(5))
    latent = _latent(tr)
    assert latent == ["0.weight", "0.bias", "2.weight", "2.bias", "sigma"]
    assert tr.nodes["obs"]["is_observed"]
    assert model.net is not net
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(m, pyro.nn.PyroModule) for m in net.modules())


def test_bayesian_subset_and_last_layer(make_net):
    m = pbnn.BNN(make_net(), bayesian=lambda n: n.endswith("weight"))
    assert m.bayesian_names == ["0.weight", "2.weight"] and m.deterministic_names == ["0.bias", "2.bias"]
    m = pbnn.BNN(make_net(), last_layer=True)
    assert m.bayesian_names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="no parameter is Bayesian"):
        pbnn.BNN(make_net(), bayesian=lambda n: False)


def test_conv_and_custom_modules_work():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 2, 3)
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (self.conv(x[:, None, :]).mean(-1) * self.scale).sum(-1, keepdim=True)

    model = pbnn.BNN(Custom())
    tr = poutine.trace(model).get_trace(torch.randn(4, 6), torch.randn(4))
    assert {"conv.weight", "conv.bias", "scale"} <= set(tr.nodes)


def test_functional_log_joint_matches_pyro_trace(make_net):
    """The functional potential (log_prior + log_likelihood) equals Pyro's own log joint."""
    for prior in (pbnn.priors.Normal(0.0, 0.7), pbnn.priors.LayerwiseNormal(), pbnn.priors.HierarchicalNormal()):
        model = pbnn.BNN(make_net(), prior=prior)
        x, y = torch.randn(7, 1), torch.randn(7)
        tr = poutine.trace(model).get_trace(x, y)
        sample = {n: tr.nodes[n]["value"] for n in _latent(tr)}
        functional = model.log_prior(sample, 1) + model.log_likelihood(sample, x, y).sum()
        assert torch.allclose(functional, tr.log_prob_sum(), atol=1e-4)


def test_subsampled_plate_scales_likelihood_by_n_over_b(make_net):
    model = pbnn.BNN(make_net(), likelihood=pbnn.likelihoods.Gaussian(0.3))
    x, y = torch.randn(40, 1), torch.randn(40)
    idx = torch.arange(10)
    tr = poutine.trace(model).get_trace(x, y, subsample=idx)
    tr.compute_log_prob()
    sample = {n: tr.nodes[n]["value"] for n in model.bayesian_names}
    minibatch_ll = model.log_likelihood(sample, x[idx], y[idx]).sum()
    obs = tr.nodes["obs"]
    assert obs["scale"] == pytest.approx(4.0)
    assert torch.allclose(obs["log_prob_sum"], 4.0 * minibatch_ll, rtol=1e-5)  # Pyro applies the scale


def test_prior_scales_and_buffers():
    p = pbnn.BNN(torch.nn.Linear(16, 2), prior=pbnn.priors.LayerwiseNormal(scale=2.0))
    d = p.prior_distributions({})
    assert torch.allclose(d["weight"].stddev, torch.full((2, 16), 0.5))  # 2 / sqrt(16)
    assert "loc" in dict(pbnn.priors.Normal(0.0, 1.0).named_buffers())
    with pytest.raises(ValueError, match="positive"):
        pbnn.priors.Normal(0.0, -1.0)


def test_hierarchical_prior_adds_scale_sites(make_net):
    model = pbnn.BNN(make_net(), prior=pbnn.priors.HierarchicalNormal())
    tr = poutine.trace(model).get_trace(torch.randn(3, 1), torch.randn(3))
    assert "0.weight.prior_scale" in tr.nodes and "2.bias.prior_scale" in tr.nodes


def test_potential_is_the_pyro_log_joint_plus_the_log_jacobian(make_net):
    """log_joint(z) = log p(theta(z), y) from a Pyro trace + log|d theta/d z| (sigma = exp(z_sigma))."""
    model = pbnn.BNN(make_net(), prior=pbnn.priors.HierarchicalNormal())
    x, y = torch.randn(9, 1), torch.randn(9)
    pot = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
    z = torch.randn(pot.dim)
    values, log_det = pot.unpack(z)
    tr = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
    positive = [n for n in pot.names if n == "sigma" or n.endswith(".prior_scale")]
    expected_log_det = sum(torch.log(values[n]).sum() for n in positive)
    assert torch.allclose(log_det, expected_log_det, atol=1e-5)
    assert torch.allclose(pot.log_joint(z), tr.log_prob_sum() + expected_log_det, atol=1e-4)
    assert torch.allclose(pot.pack(values), z, atol=1e-5)
    # Minibatch: the log-likelihood part is scaled by N / B.
    idx = torch.tensor([0, 4, 7])
    full_prior = pot.log_joint(z) - model.log_likelihood(values, x, y).sum()
    mb = pot.log_joint(z, idx) - full_prior
    assert torch.allclose(mb, 3.0 * model.log_likelihood(values, x[idx], y[idx]).sum(), atol=1e-4)
