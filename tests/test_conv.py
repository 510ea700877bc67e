"""Architectures and frozen backbones (issue 26, items 3 and 4): frozen parameters are left alone
by every backend, BatchNorm statistics match the weights they are used with, Conv2d KFAC and the
per-example SVI estimators on Conv2d agree with brute force, outputs with extra dims keep their shape.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_backend_contract import FAST

import pbnn
from pbnn.infer.base import BACKENDS


# ----------------------------------------------------------------------------- frozen backbones
def _frozen_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net[0].requires_grad_(False)
    return net


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_leaves_frozen_parameters_bit_identical(name):
    net = _frozen_net()
    frozen = {k: v.clone() for k, v in net[0].state_dict().items()}
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    assert model.frozen_names == ["0.weight", "0.bias"] and model.bayesian_names == ["2.weight", "2.bias"]
    x = torch.linspace(-2, 2, 16)[:, None]
    y = torch.sin(2 * x[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = pbnn.fit(model, x, y, method=name, progress=False, seed=0, **FAST.get(name, {}))
        mean = post.predict(x).mean
    for k, v in frozen.items():
        assert torch.equal(model.net[0].state_dict()[k], v), k
        assert f"0.{k}" not in post.samples and f"0.{k}" not in post.fixed
    # the prediction uses the frozen values: perturbing them now changes it
    with torch.no_grad():
        model.net[0].bias.add_(1.0)
    assert not torch.allclose(post.predict(x).mean, mean)


def test_frozen_parameters_are_excluded_from_bayesian_and_last_layer():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[3].requires_grad_(False)  # a frozen head: last_layer picks the last trainable layer
    m = pbnn.BNN(net, last_layer=True)
    assert (m.bayesian_names, m.deterministic_names, m.frozen_names) == (
        ["2.weight", "2.bias"],
        ["0.weight", "0.bias"],
        ["3.weight", "3.bias"],
    )
    m = pbnn.BNN(net, bayesian=lambda n: True)  # bayesian= cannot select a frozen parameter
    assert "3.weight" not in m.bayesian_names
    with pytest.raises(ValueError, match="requires_grad=False"):
        pbnn.BNN(torch.nn.Linear(1, 1).requires_grad_(False))
