import pyro
import pytest
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


# ---------------------------------------------------------------------------- minibatch resume
def _minibatch_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(200, generator=g)


def _minibatch_fit(method, path, seed, caller_seed=123, **kw):
    """A minibatch fit (4 batches per epoch); ``caller_seed``: the global RNG state it starts from
    (with ``seed=None`` the fit draws from it, so a resumed job, a new process, has another)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    torch.manual_seed(caller_seed)
    opts = dict(num_steps=30, batch_size=64, seed=seed, lr=0.05, progress=False, checkpoint_path=str(path))
    if method == "svi":
        opts["num_samples"] = 5
    return pbnn.fit(pbnn.BNN(net), *_minibatch_data(), method=method, checkpoint_every=10, **opts, **kw)


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (no finally writes a checkpoint)."""


def kill_at(monkeypatch, step):
    """Make the optimisation loop die when it reaches ``step`` (its progress bar is the loop)."""
    from pbnn.engine import optim

    real = optim.tqdm

    def bar(iterable, **kw):
        inner = real(iterable, **kw)

        class Bar:
            def __iter__(self):
                for t in inner:
                    if t == step:
                        raise Killed(step)
                    yield t

            def set_postfix(self, *a, **k):
                pass

        return Bar()

    monkeypatch.setattr(optim, "tqdm", bar)


def minibatch_resume_case(method, seed, tmp_path, monkeypatch, **kw):
    """(uninterrupted posterior, resumed posterior, checkpoint step at the kill)."""
    ref = _minibatch_fit(method, tmp_path / "ref.pt", seed, **kw)
    path = tmp_path / "killed.pt"
    with monkeypatch.context() as m:
        kill_at(m, 25)  # dies after the checkpoint of step 19, in the second half of an epoch
        with pytest.raises(Killed):
            _minibatch_fit(method, path, seed, **kw)
    saved = torch.load(path, weights_only=False)["step"]
    return ref, _minibatch_fit(method, path, seed, caller_seed=999, **kw), saved


@pytest.mark.parametrize("seed", [7, None])
@pytest.mark.parametrize("method", ["svi", "map"])
def test_killed_minibatch_fit_resumes_bit_identically(method, seed, tmp_path, monkeypatch):
    """Kill (simulated) after a checkpoint, resume: the same losses, parameters and draws as the
    uninterrupted run. With ``seed=None`` the resumed job's own RNG differs, so this needs the
    minibatch schedule's seed and the RNG state restored from the checkpoint."""
    ref, resumed, saved = minibatch_resume_case(method, seed, tmp_path, monkeypatch)
    assert saved == 19
    assert resumed.info["losses"] == ref.info["losses"] and len(ref.info["losses"]) == 30
    assert ref.samples.keys() == resumed.samples.keys()
    for k in ref.samples:
        assert torch.equal(resumed.samples[k], ref.samples[k]), k
    if method == "svi":
        assert torch.equal(resumed.approximation.q.mean, ref.approximation.q.mean)
