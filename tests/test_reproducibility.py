import pyro
import torch

import pbnn


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, generator=g)
    return x, torch.sin(2 * x[:, 0])


def _fit(make_net, seed, model=None, **kw):
    x, y = _data()
    return pbnn.fit(
        model or pbnn.BNN(make_net()),
        x,
        y,
        method="svi",
        num_steps=100,
        num_samples=20,
        seed=seed,
        progress=False,
        **kw,
    )


def test_same_seed_identical_samples(make_net):
    a, b = _fit(make_net, 3), _fit(make_net, 3)
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k])
    c = _fit(make_net, 4)
    assert not torch.equal(a.samples["0.weight"], c.samples["0.weight"])


def test_fit_leaves_global_param_store_and_rng_alone(make_net):
    pyro.clear_param_store()
    pyro.param("user_param", torch.tensor(1.0))
    model = pbnn.BNN(make_net())
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    _fit(make_net, 0, model=model)
    assert torch.equal(torch.rand(1), expected_next)
    assert list(pyro.get_param_store().keys()) == ["user_param"]


def test_two_fits_are_independent(make_net):
    first = _fit(make_net, 0, guide="mean_field")
    x, y = _data()
    pbnn.fit(pbnn.BNN(make_net(seed=5)), x, -y, method="svi", num_steps=100, seed=1, progress=False)
    again = _fit(make_net, 0, guide="mean_field")
    assert torch.equal(first.samples["0.weight"], again.samples["0.weight"])


def test_save_load_round_trip(make_net, tmp_path):
    post = _fit(make_net, 0)
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = pbnn.Posterior.load(path, model=post.model)
    for k in post.samples:
        assert torch.equal(post.samples[k], loaded.samples[k])
    xt = torch.linspace(-1, 1, 9)[:, None]
    assert torch.equal(post.predict(xt).samples, loaded.predict(xt).samples)
    assert torch.equal(
        post.predict(xt, num_samples=40, seed=1).samples, loaded.predict(xt, num_samples=40, seed=1).samples
    )
