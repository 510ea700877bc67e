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
# NUTS / HMC trees on a conv net are slow on a CPU: shallower trees and one chain here
CONV_FAST = {**FAST, "nuts": {**FAST["nuts"], "max_tree_depth": 3, "num_chains": 1}}
CONV_FAST["hmc"] = {**FAST["hmc"], "num_leapfrog_steps": 5, "num_chains": 1}
CONV_FAST["csghmc"] = {"num_samples": 4, "map_steps": 5, "num_cycles": 2}


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
        post = pbnn.fit(model, x, y, method=name, progress=False, seed=0, **CONV_FAST.get(name, {}))
        mean = post.predict(x).mean
    for k, v in frozen.items():
        assert torch.equal(model.net[0].state_dict()[k], v), k
        assert f"0.{k}" not in post.samples and f"0.{k}" not in post.fixed
    # the prediction uses the frozen values: perturbing them now changes it
    with torch.no_grad():
        model.net[0].bias.add_(1.0)
    assert not torch.allclose(post.predict(x).mean, mean)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_fits_and_predicts_a_bayesian_conv2d(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 3, 3, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = pbnn.fit(model, x, x.mean((1, 2, 3)), method=name, progress=False, seed=0, **CONV_FAST.get(name, {}))
    assert "0.weight" in post.samples  # the conv kernel is Bayesian
    draws = post.samples["0.weight"].flatten(0, 1)
    assert draws.shape[1:] == (2, 1, 2, 2) and torch.isfinite(draws).all()
    pred = post.predict(x)
    assert pred.mean.shape == (16,) and torch.isfinite(pred.mean).all()


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


# ----------------------------------------------------------------------------- KFAC on Conv2d (KFC)
def _row_major(out: int, k: int) -> torch.Tensor:
    """Index into the flat ``[weight, bias]`` layout of each entry of the row-major ``[W | b]``."""
    return torch.tensor([o * k + j if j < k else out * k + o for o in range(out) for j in range(k + 1)])


def test_kfac_conv2d_is_exact_for_a_per_pixel_gaussian_last_layer():
    # Last layer, Gaussian on every pixel: B = I and Lambda = I / sigma^2, so the per-location
    # gradients are orthogonal unit vectors and KFC's G kron A equals the GGN block exactly.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(3, 2, 2, stride=2, padding=1),
        torch.nn.Flatten(),
    )
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.5))
    x, params, names = torch.randn(5, 1, 5, 5), model.parameter_values(), ["2.weight", "2.bias"]
    G, A = pbnn.infer.curvature.kfac_factors(model, names, params, x, {})["2"]
    exact = pbnn.infer.curvature.ggn_full(model, names, params, x, {})
    idx = _row_major(2, 3 * 2 * 2)
    assert torch.allclose(torch.kron(G.double(), A.double()), exact[idx][:, idx], rtol=1e-4, atol=1e-4)


def test_kfac_conv2d_factors_match_the_kfc_formula_by_brute_force():
    # A = mean over points and locations of patch outer products (bias 1 appended), G = sum over points,
    # locations and Lambda's square-root columns of g g^T, computed here with explicit patches and the
    # Jacobian of the rest of the net in the layer's output.
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, stride=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(3, 2, 2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 2 * 2, 3),
    )
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())
    x, params = torch.randn(4, 2, 5, 5), model.parameter_values()
    factors = pbnn.infer.curvature.kfac_factors(model, model.bayesian_names, params, x, {})
    f = net(x)
    L = pbnn.infer.curvature.loss_hessian_sqrt(model.likelihood, f.detach(), {})
    for i, pad, stride in ((0, 1, 2), (2, 0, 1)):
        conv, inp = net[i], net[:i](x).detach()
        out = conv(inp).detach()
        kh = conv.kernel_size[0]
        padded = torch.nn.functional.pad(inp, (pad,) * 4)
        patches = torch.stack(
            [
                torch.cat(
                    [
                        padded[n, :, r * stride : r * stride + kh, c * stride : c * stride + kh].reshape(-1),
                        torch.ones(1),
                    ]
                )
                for n in range(len(x))
                for r in range(out.shape[2])
                for c in range(out.shape[3])
            ]
        )
        A = patches.T @ patches / len(patches)
        G, rest = 0.0, net[i + 1 :]
        for n in range(len(x)):
            J = torch.autograd.functional.jacobian(lambda o, rest=rest: rest(o[None])[0], out[n])  # [C, out, H, W]
            g = torch.einsum("ck,cohw->khwo", L[n], J).reshape(-1, out.shape[1])
            G = G + g.T @ g
        assert torch.allclose(factors[str(i)][1], A, atol=1e-5)
        assert torch.allclose(factors[str(i)][0], G, atol=1e-5)


def test_kfac_laplace_fits_and_predicts_a_conv_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 3)
    )
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())
    x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
    post = pbnn.fit(
        model, x, y, method="laplace", hessian="kfac", subset="all", map_steps=50, num_samples=5, progress=False, seed=0
    )
    assert post.samples["0.weight"].shape == (1, 5, 2, 1, 3, 3)
    p = post.predict(x).mean
    assert p.shape == (30, 3) and torch.allclose(p.sum(-1), torch.ones(30))
    # the KFAC posterior's weight draws have the Kronecker covariance: check one layer's covariance
    # against the factors (the mean and the per-coordinate spread of many draws)
    approx = post.approximation
    draws = approx.sample(4000, seed=0)
    flat = torch.cat([draws["0.weight"].reshape(4000, 2, -1), draws["0.bias"][..., None]], -1).reshape(4000, -1)
    lg, qg, la, qa = approx.eig["0"]
    cov = torch.kron(qg, qa) @ torch.diag(1 / (lg[:, None] * la[None, :] + approx.prior_precision["0"]).reshape(-1))
    cov = cov @ torch.kron(qg, qa).T
    var = flat.double().var(0)
    # a variance estimate from 4000 draws has relative standard error sqrt(2 / 3999) ~ 2.2%: allow 5 of them
    assert torch.allclose(var, cov.diagonal(), rtol=0.12)


# ----------------------------------------------------------------------------- BatchNorm statistics
def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1),
        torch.nn.BatchNorm2d(2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 3 * 3, 1),
    )


def _bn_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 3, 3, generator=g)
    return x, x.mean((1, 2, 3)) + 0.1 * torch.randn(12, generator=g)


BN_FAMILIES = {
    "sgld": {"num_samples": 4, "warmup": 5},  # sampling: per-draw statistics
    "mh": {"num_samples": 3, "warmup": 5, "num_chains": 1, "init": "net", "warn": False},
    "ensemble": {"num_members": 2, "num_steps": 10},
    "swag": {"start": 5, "num_steps": 20, "num_samples": 3},
    "svi": {"num_steps": 10, "num_samples": 3},
    "laplace": {"map_steps": 10, "num_samples": 3, "predictive": "nn", "hessian": "diag"},
}


@pytest.mark.parametrize("name", sorted(BN_FAMILIES))
def test_each_draw_predicts_with_the_batchnorm_statistics_of_the_training_data_under_its_weights(name):
    # The statistics a draw predicts with are the mean and (unbiased) variance of the BatchNorm
    # inputs over the training data computed with that draw's weights: recomputed here by hand.
    model = pbnn.BNN(_bn_net(), prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Gaussian(0.5))
    x, y = _bn_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = pbnn.fit(model, x, y, method=name, progress=False, seed=0, **BN_FAMILIES[name])
    x_new = torch.randn(5, 1, 3, 3)
    f = post.predict(x_new).samples
    draws = {k: v.flatten(0, 1) for k, v in post.samples.items()}
    net = _bn_net().eval()
    for s in range(f.shape[0]):
        params = {**post.fixed, **{k: v[s] for k, v in draws.items()}}
        h = torch.nn.functional.conv2d(x, params["0.weight"], params["0.bias"], padding=1)
        stats = {"1.running_mean": h.mean((0, 2, 3)), "1.running_var": h.var((0, 2, 3))}
        expected = torch.func.functional_call(net, {**params, **stats}, (x_new,))
        assert torch.allclose(f[s], expected, atol=1e-5), s


def test_batchnorm_in_eval_mode_keeps_its_statistics():
    # A frozen backbone's BatchNorm in eval mode: neither training nor the refresh changes its statistics.
    net = _bn_net()
    net[:2].requires_grad_(False).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(2.0)
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.5))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    x, y = _bn_data()
    post = pbnn.fit(model, x, y, method="swag", progress=False, seed=0, **BN_FAMILIES["swag"])
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
    f = post.predict(x).samples
    draws = {k: v.flatten(0, 1) for k, v in post.samples.items()}
    for s in range(f.shape[0]):
        expected = torch.func.functional_call(net, {k: v[s] for k, v in draws.items()}, (x,))
        assert torch.allclose(f[s], expected, atol=1e-5)


# ----------------------------------------------------------------------------- last layer from features
def _last_layer_case():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh())
    net = torch.nn.Sequential(backbone.requires_grad_(False), torch.nn.Linear(8, 4))
    x = torch.randn(40, 3)
    return pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical()), x, torch.randint(0, 4, (40,))


def test_last_layer_jacobian_from_features_equals_autodiff():
    from pbnn.infer import curvature

    model, x, _ = _last_layer_case()
    params, names = model.parameter_values(), model.bayesian_names
    phi, f = curvature.final_layer_features(model, names, params, x)
    assert torch.allclose(f, model.net(x)) and torch.allclose(phi, model.net[0](x))
    layout = curvature.weight_layout(params, names)
    jac = torch.func.vmap(
        torch.func.jacrev(lambda th, x1: model.output({**params, **layout.split(th)}, x1[None])[0]), in_dims=(None, 0)
    )(layout.join(params), x)
    assert torch.allclose(curvature.output_jacobian(model, names, params, x), jac, atol=1e-6)
    # not a final layer (something follows it): no feature path
    assert curvature.final_layer_features(model, ["0.2.weight", "0.2.bias"], params, x) is None


@pytest.mark.parametrize("hessian", ["kfac", "diag", "ggn"])
def test_last_layer_glm_predictive_from_features_equals_the_jacobian_one(hessian):
    model, x, y = _last_layer_case()
    post = pbnn.fit(model, x, y, method="laplace", hessian=hessian, map_steps=30, num_samples=6, progress=False, seed=0)
    pred = post.predict(x[:7])
    params = {**post.fixed, **post.predictor.mean}
    J = torch.func.vmap(
        torch.func.jacrev(lambda th, x1: model.output({**params, **post.approximation.layout.split(th)}, x1[None])[0]),
        in_dims=(None, 0),
    )(post.approximation.layout.join(post.predictor.mean), x[:7])
    F = post.approximation.functional_covariance(J).float()
    assert torch.allclose(pred.f_cov, F, rtol=1e-4, atol=1e-6)
    dtheta = post.approximation.layout.join(
        {n: v.flatten(0, 1) - post.predictor.mean[n] for n, v in post.samples.items()}
    )
    f_s = model.output(params, x[:7]) + torch.einsum("mcd,sd->smc", J, dtheta)
    assert torch.allclose(pred.samples, f_s, atol=1e-5)


def test_last_layer_ggn_diagonal_from_features_equals_the_full_ggn_diagonal():
    from pbnn.infer import curvature

    model, x, _ = _last_layer_case()
    params, names = model.parameter_values(), model.bayesian_names
    full = curvature.ggn_full(model, names, params, x, {})
    assert torch.allclose(curvature.ggn_diag(model, names, params, x, {}), full.diagonal(), rtol=1e-6)


# ----------------------------------------------------------------------------- outputs with extra dims
def test_per_pixel_per_token_and_shaped_regression_likelihoods_match_torch():
    torch.manual_seed(0)
    F = torch.nn.functional
    lik = pbnn.likelihoods.Categorical(class_dim=1)  # per-pixel logits [N, C, H, W], labels [N, H, W]
    lik.set_output_shape((3, 4, 5))
    f, y = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    expected = -F.cross_entropy(f, y, reduction="none").sum((1, 2))
    assert torch.allclose(lik.log_prob(f.flatten(1), {}, y), expected, atol=1e-5)
    assert torch.allclose(lik.conditional(f.flatten(1), {}).log_prob(y), expected, atol=1e-5)
    assert lik.validate_targets(y, 60).shape == (2, 4, 5)
    with pytest.raises(ValueError, match=r"shape \[N, 4, 5\]"):
        lik.validate_targets(y[:, 0], 60)
    tok = pbnn.likelihoods.Categorical()  # per-token logits [N, T, C], labels [N, T]
    tok.set_output_shape((4, 3))
    f, y = torch.randn(2, 4, 3), torch.randint(0, 3, (2, 4))
    expected = -F.cross_entropy(f.transpose(1, 2), y, reduction="none").sum(1)
    assert torch.allclose(tok.log_prob(f.flatten(1), {}, y), expected, atol=1e-5)
    reg = pbnn.likelihoods.Gaussian(0.5)  # [N, D1, D2]
    reg.set_output_shape((2, 3))
    f, y = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    expected = torch.distributions.Normal(f, 0.5).log_prob(y).sum((1, 2))
    assert torch.allclose(reg.log_prob(f.flatten(1), {}, y), expected, atol=1e-5)
    assert torch.allclose(reg.conditional(f.flatten(1), {}).log_prob(y), expected, atol=1e-5)
    with pytest.raises(ValueError, match="Flatten"):
        pbnn.likelihoods.MultiTaskGaussian().set_output_shape((2, 3))


@pytest.mark.parametrize("case", ["pixels", "tokens", "regression"])
def test_shaped_outputs_keep_their_shape_through_fit_and_predictive(case):
    torch.manual_seed(0)
    if case == "pixels":
        net, lik = torch.nn.Conv2d(1, 3, 3, padding=1), pbnn.likelihoods.Categorical(class_dim=1)
        x, y, mean_shape = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10, 4, 4)), (10, 4, 4, 3)
    elif case == "tokens":
        net, lik = torch.nn.Linear(4, 3), pbnn.likelihoods.Categorical()
        x, y, mean_shape = torch.randn(10, 5, 4), torch.randint(0, 3, (10, 5)), (10, 5, 3)
    else:
        net, lik = (
            torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Unflatten(1, (2, 3))),
            pbnn.likelihoods.Gaussian(0.5),
        )
        x, y, mean_shape = torch.randn(10, 4), torch.randn(10, 2, 3), (10, 2, 3)
    model = pbnn.BNN(net, likelihood=lik)
    post = pbnn.fit(model, x, y, method="map", num_steps=5, progress=False, seed=0)
    pred = post.predict(x)
    assert pred.mean.shape == mean_shape
    # one draw: the predictive log density is the likelihood of the network output, per point
    f = model.output({**post.fixed, **{k: v[0, 0] for k, v in post.samples.items()}}, x)
    assert torch.allclose(pred.log_prob(y), model.likelihood.log_prob(f, {}, y), atol=1e-5)
    if lik.is_classification:
        assert pred.entropy.shape == mean_shape[:-1]
    post = pbnn.fit(model, x, y, method="svi", num_steps=5, num_samples=4, progress=False, seed=0)
    assert post.predict(x).mean.shape == mean_shape and post.predict(x).log_prob(y).shape == (10,)
