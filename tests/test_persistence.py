"""Persistence: atomic saves, checkpoints that hold plain data and know what they belong to,
posterior files that run no code and detect corruption (issue 27)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import pbnn

ROOT = Path(__file__).resolve().parents[1]


def _posterior(num_draws: int = 3, width: int = 4) -> pbnn.Posterior:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    x = torch.randn(10, 2)
    samples = {n: torch.randn(1, num_draws, *p.shape) for n, p in net.named_parameters()}
    return pbnn.Posterior(model, samples, data=pbnn.data.Data(x, x.sum(1)), method="made-up")


def test_save_killed_mid_write_keeps_previous_file(tmp_path):
    path = tmp_path / "post.pt"
    old = _posterior()
    old.save(path)
    marker = tmp_path / "writing"
    # A large posterior saved over the file; the writer is killed with SIGKILL once every byte
    # is written but before it is in place (os.fsync is patched to announce that and wait).
    script = textwrap.dedent(f"""
        import os, time, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_persistence import _posterior
        real = os.fsync
        def fsync(fd):
            real(fd)
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        os.fsync = fsync
        _posterior(num_draws=200, width=2000).save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the writer never reached fsync"
        assert path.stat().st_size < 1_000_000  # the large new content is not in place yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded = pbnn.Posterior.load(path, model=old.model)
    for k, v in old.samples.items():
        assert torch.equal(loaded.samples[k], v)


def test_save_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "post.pt"
    post = _posterior()
    post.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        post.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post.pt"]


# ---------------------------------------------------------------------------- checkpoints
class _Evil:
    """Unpickling this creates a marker file: loading it must never run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fit(path, *, width: int = 2, seed: int = 0, lr: float = 0.01, slope: float = 2.0, method: str = "map"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    x = torch.linspace(-1, 1, 8)[:, None]
    return pbnn.fit(
        model,
        x,
        slope * x[:, 0],
        method=method,
        num_steps=6,
        lr=lr,
        seed=seed,
        progress=False,
        checkpoint_path=str(path),
        checkpoint_every=3,
    )


def test_crafted_checkpoint_runs_no_code(tmp_path):
    path, marker = tmp_path / "c.pt", tmp_path / "pwned"
    torch.save({"params": [_Evil(marker)], "step": 0}, path)
    with pytest.raises(ValueError, match="not a pbnn checkpoint that holds only tensors.*delete"):
        _fit(path)
    assert not marker.exists()


def test_checkpoint_is_plain_data_and_resumes_identically(tmp_path):
    path = tmp_path / "c.pt"
    first = _fit(path)
    state = torch.load(path, weights_only=True)  # tensors and plain data only
    assert state["format"] == "pbnn.checkpoint" and state["step"] == 5
    assert state["fingerprint"]["method"] == "map" and state["fingerprint"]["seed"] == 0
    again = _fit(path)  # finished checkpoint: resumes at the end, same numbers
    assert torch.equal(first.samples["0.weight"], again.samples["0.weight"])


@pytest.mark.parametrize(
    "change, named",
    [
        ({"slope": -3.0}, "data hash"),
        ({"seed": 1}, "seed"),
        ({"lr": 0.02}, "lr"),
        ({"width": 3}, "parameter shapes"),
        ({"method": "svi"}, "method"),
    ],
)
def test_stale_checkpoint_names_the_difference(tmp_path, change, named):
    path = tmp_path / "c.pt"
    _fit(path)
    with pytest.raises(ValueError, match=f"belongs to another fit.*{named}.*delete .* or pass another checkpoint_path"):
        _fit(path, **change)


def test_checkpoint_of_an_older_pbnn_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"params": [torch.zeros(2)], "step": 3, "losses": [1.0]}, path)
    with pytest.raises(ValueError, match="is not a pbnn checkpoint; to start afresh"):
        _fit(path)


# ---------------------------------------------------------------------------- posterior files
def _saved(tmp_path, post=None):
    post = post or _posterior()
    path = tmp_path / "post.pt"
    post.save(path)
    return post, path


def test_crafted_old_style_posterior_runs_no_code(tmp_path):
    post, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"samples": post.samples, "info": {"x": _Evil(marker)}, "model": None}, path)
    with pytest.raises(ValueError, match="not a posterior file of this pbnn's format.*trusted=True"):
        pbnn.Posterior.load(path, model=post.model)
    assert not marker.exists()


def test_crafted_payload_with_a_valid_checksum_runs_no_code(tmp_path):
    from pbnn.posterior import serialization

    post, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    path.write_bytes(serialization.dump({"samples": post.samples, "info": {"x": _Evil(marker)}}))
    with pytest.raises(ValueError, match="holds more than tensors and plain data"):
        pbnn.Posterior.load(path, model=post.model)
    assert not marker.exists()


@pytest.mark.parametrize("where", [0, 20, "middle", -1])
def test_a_flipped_byte_is_a_clear_error(tmp_path, where):
    post, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if where == "middle" else where
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        pbnn.Posterior.load(path, model=post.model)


def test_truncated_file_is_a_clear_error(tmp_path):
    post, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged.*header says"):
        pbnn.Posterior.load(path, model=post.model)


def test_model_is_required_or_trusted(tmp_path):
    post, path = _saved(tmp_path)
    with pytest.raises(ValueError, match="pass model=.*or trusted=True"):
        pbnn.Posterior.load(path)
    loaded = pbnn.Posterior.load(path, trusted=True, map_location="cpu")  # unpickles the stored model
    assert isinstance(loaded.model, pbnn.BNN) and loaded.model is not post.model
    x = torch.randn(3, 2)
    assert torch.equal(loaded.predict(x).samples, post.predict(x).samples)


def test_model_that_does_not_match_the_file_is_refused(tmp_path):
    post, path = _saved(tmp_path)
    other = _posterior(width=5).model
    with pytest.raises(ValueError, match="does not match the file.*parameters.*pass the model"):
        pbnn.Posterior.load(path, model=other)
    classifier = pbnn.BNN(post.model.net, likelihood=pbnn.likelihoods.Categorical())
    with pytest.raises(ValueError, match="likelihood: file 'Gaussian', model= 'Categorical'"):
        pbnn.Posterior.load(path, model=classifier)


def test_old_format_loads_only_when_trusted(tmp_path):
    post, path = _saved(tmp_path)
    state = {"samples": post.samples, "sample_stats": {}, "fixed": {}, "x": post.data.x, "y": post.data.y,
             "method": "old", "approximation": None, "predictor": None, "info": {}, "model": post.model}  # fmt: skip
    torch.save(state, path)
    with pytest.raises(ValueError, match="trusted=True"):
        pbnn.Posterior.load(path, model=post.model)
    old = pbnn.Posterior.load(path, trusted=True)
    assert old.method == "old" and torch.equal(old.samples["0.weight"], post.samples["0.weight"])


def test_info_that_is_not_plain_data_is_left_out_and_named(tmp_path):
    import numpy as np

    post = _posterior()
    post.info.update({"losses": [1.0, np.float64(0.5)], "table": np.ones(2), "callback": print})
    _, path = _saved(tmp_path, post)
    loaded = pbnn.Posterior.load(path, model=post.model)
    assert loaded.info["losses"] == [1.0, 0.5] and type(loaded.info["losses"][1]) is float
    assert torch.equal(loaded.info["table"], torch.ones(2, dtype=torch.float64))
    assert "callback" not in loaded.info and "['callback']" in loaded.info["save_warning"]


def test_unregistered_predictor_is_refused_at_save(tmp_path):
    post = _posterior()
    post.predictor = lambda p, draws, x: None
    with pytest.raises(ValueError, match="register"):
        post.save(tmp_path / "p.pt")


def _approximations():
    from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, transforms

    from pbnn.posterior.approx import FlatApproximation, KroneckerApproximation, SwagMoments

    sites = [
        ("w", torch.Size([2]), transforms.identity_transform),
        ("s", torch.Size([]), transforms.ExpTransform()),
        (
            "u",
            torch.Size([]),
            transforms.ComposeTransform([transforms.SigmoidTransform(), transforms.AffineTransform(1.0, 2.0)]),
        ),  # noqa: E501
    ]
    L = torch.tensor([[1.0, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.2, 1, 0], [0.1, 0, 0, 2]])
    mom = SwagMoments(dim=4, rank=2, num_runs=2)
    for t in range(3):
        mom.update(torch.randn(2, 4, generator=torch.Generator().manual_seed(t)))
    return {
        "diag": FlatApproximation(Independent(Normal(torch.arange(4.0), torch.ones(4)), 1), sites),
        "full": FlatApproximation(MultivariateNormal(torch.zeros(4), scale_tril=L), sites),
        "low_rank": FlatApproximation(LowRankMultivariateNormal(torch.zeros(4), L[:, :2], torch.ones(4)), sites),
        "swag": FlatApproximation(mom.distribution(0.5), sites),
        "kron": KroneckerApproximation(
            [("", "weight", "bias")],
            {"weight": torch.ones(1, 2), "bias": torch.zeros(1)},
            {"": (2 * torch.eye(1), torch.tensor([[2.0, 0.5, 0], [0.5, 1, 0], [0, 0, 1]]))},
            {"": 0.7},
        ),
    }


def _site_model(x, y=None):  # a Pyro model with the sites of _approximations (never pickled: a lambda holds it)
    import pyro
    import pyro.distributions as dist

    pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("u", dist.Uniform(1.0, 3.0))
    pyro.sample("weight", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
    pyro.sample("bias", dist.Normal(0.0, 1.0).expand([1]).to_event(1))


@pytest.mark.parametrize("kind", ["diag", "full", "low_rank", "swag", "kron"])
def test_approximations_round_trip_without_pickle(tmp_path, kind):
    from pbnn.posterior import serialization

    approx = _approximations()[kind]
    draws = approx.sample(2, seed=0)
    model = lambda x, y=None: _site_model(x, y)  # noqa: E731
    data = pbnn.data.Data(torch.zeros(3, 1), torch.zeros(3))
    post = pbnn.Posterior(model, {k: v[None] for k, v in draws.items()}, data=data, method="m", approximation=approx)
    path = tmp_path / "p.pt"
    post.save(path)  # the lambda does not pickle: the file says so
    assert "model not saved" in post.info["save_warning"]
    with open(path, "rb") as f:
        assert serialization.read(f, "p")["approximation"]["type"] in ("flat", "kronecker")  # a tag, no pickle
    with pytest.raises(ValueError, match="holds no model"):
        pbnn.Posterior.load(path, trusted=True)
    loaded = pbnn.Posterior.load(path, model=model)
    assert type(loaded.approximation) is type(approx)
    for k, v in approx.sample(7, seed=3).items():
        assert torch.equal(loaded.approximation.sample(7, seed=3)[k], v)
    z = approx.loc + 0.1
    assert torch.equal(loaded.approximation.log_prob(z), approx.log_prob(z))


def test_pyro_model_posterior_round_trip_checks_sites(tmp_path):
    import pyro
    import pyro.distributions as dist

    def model(x, y=None, subsample=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", len(x), subsample=subsample) as i:
            pyro.sample("obs", dist.Normal(w * x[i, 0], sigma), obs=None if y is None else y[i])

    def wider(x, y=None, subsample=None):
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("sigma", dist.HalfNormal(1.0))

    x = torch.linspace(-1, 1, 8)[:, None]
    post = pbnn.fit(model, x, 2 * x[:, 0], method="svi", num_steps=5, num_samples=4, seed=0, progress=False)
    path = tmp_path / "p.pt"
    post.save(path)
    loaded = pbnn.Posterior.load(path, model=model)
    assert torch.equal(loaded.predict(x, num_samples=9, seed=1).samples, post.predict(x, num_samples=9, seed=1).samples)
    with pytest.raises(ValueError, match=r"does not match the file's sites \(w: file \(\), model= \(2,\)"):
        pbnn.Posterior.load(path, model=wider)


def test_minibatch_resume_after_a_kill_is_bit_identical(tmp_path):
    from pbnn.engine.optim import decay, optimise

    x = torch.linspace(-1, 1, 10)

    def run(path, fail_at=None):
        w = torch.zeros(2, requires_grad=True)
        calls = {"n": 0}

        def loss(idx):
            calls["n"] += 1
            if fail_at is not None and calls["n"] > fail_at:
                raise KeyboardInterrupt("killed")
            noise = 0.1 * torch.randn(len(idx))  # the RNG, which the checkpoint restores
            return ((w[0] * x[idx] + w[1] - 2 * x[idx] - noise) ** 2).sum()

        opts = dict(num_steps=12, lr=decay(0.1, 12), n=10, batch_size=3, desc="t", progress=False)
        losses = optimise([w], loss, checkpoint_path=path, checkpoint_every=4, **opts)
        return w.detach(), losses

    torch.manual_seed(0)
    ref, ref_losses = run(tmp_path / "a.pt")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", fail_at=6)  # dies after the checkpoint at step 4
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 3
    torch.manual_seed(0)
    resumed, losses = run(tmp_path / "b.pt")
    assert torch.equal(resumed, ref) and losses == ref_losses
