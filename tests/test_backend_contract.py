"""The contract every backend keeps, checked for every name in ``pbnn.infer.BACKENDS`` and for a
toy backend written only against the documented interface (``docs/writing_a_backend.md``).

For each backend, on a tiny BNN: the same seed gives identical draws; the caller's torch RNG
and Pyro parameter store are left as they were; a Posterior survives save / load; predictions
have the documented shapes; and a hand-written Pyro model is either fitted (``"pyro"`` in
``model_kinds``) or refused with an error that names what is needed.
"""

from __future__ import annotations

import dataclasses
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.core.options import option, positive, positive_int
from pbnn.infer.base import BACKENDS, Backend, RunOptions, register


# ----------------------------------------------------------------------------- the toy backend
@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportanceResampling(Backend, RunOptions):
    """Sampling-importance-resampling with a Gaussian proposal around the initial point."""

    num_proposals: int = option(2000, positive_int)
    num_samples: int = option(100, positive_int)
    scale: float = option(0.3, positive)

    def run(self, potential):
        z = potential.initial_z() + self.scale * torch.randn(self.num_proposals, potential.dim)
        proposal = torch.distributions.Normal(potential.initial_z(), self.scale).log_prob(z).sum(-1)
        with torch.no_grad():
            log_w = potential.log_joint_batch(z) - proposal
        idx = torch.multinomial(torch.softmax(log_w, 0), self.num_samples, replacement=True)
        ess = float(1 / (torch.softmax(log_w, 0) ** 2).sum())
        return self.posterior(potential, potential.layout.constrain(z[idx][None]), info={"ess": ess})


@pytest.fixture
def toy_registered():
    register("toy-sir")(ImportanceResampling)
    yield
    BACKENDS.pop("toy-sir")


# Options that make each backend fast on a tiny problem; every other option is the default.
FAST = {
    "svi": {"num_steps": 30, "num_samples": 20},
    "map": {"num_steps": 30},
    "laplace": {"map_steps": 30, "num_samples": 20},
    "nuts": {"num_samples": 10, "warmup": 10, "num_chains": 2, "init": "net", "warn": False},
    "hmc": {"num_samples": 10, "warmup": 10, "num_chains": 2, "init": "net", "warn": False},
    "mh": {"num_samples": 10, "warmup": 20, "num_chains": 2, "init": "net", "warn": False},
    "sgld": {"num_samples": 10, "warmup": 10},
    "sghmc": {"num_samples": 10, "warmup": 10},
    "psgld": {"num_samples": 10, "warmup": 10},
    "csgld": {"num_samples": 8, "map_steps": 20},
    "csghmc": {"num_samples": 8, "map_steps": 20},
    "ensemble": {"num_members": 2, "num_steps": 30},
    "swa": {"start": 20, "num_steps": 40},
    "swag": {"start": 20, "num_steps": 40, "num_samples": 10},
    "multiswag": {"num_members": 2, "start": 20, "num_steps": 40, "num_samples": 10},
    "fge": {"map_steps": 20, "num_cycles": 2, "cycle_length": 10},
    "mc-dropout": {"num_steps": 30, "num_samples": 10},
    "dropconnect": {"num_steps": 30, "num_samples": 10},
    "toy-sir": {"num_proposals": 200, "num_samples": 20},
}
NAMES = sorted(BACKENDS) + ["toy-sir"]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 24)[:, None]
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(24, generator=g)


def _bnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    return pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(scale="learned"))


def _pyro_model(x, y=None, subsample=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", len(x), subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(w * x[i, 0], sigma), obs=None if y is None else y[i])


def _fit(name, model, x, y, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of deliberately short runs
        return pbnn.fit(model, x, y, method=name, progress=False, **{**FAST.get(name, {}), **extra})


@pytest.mark.parametrize("name", NAMES)
def test_backend_contract(name, tmp_path, toy_registered):
    x, y = _data()
    model = _bnn()
    cls = BACKENDS[name]
    assert dataclasses.is_dataclass(cls), f"{name}: options must be declared (a frozen dataclass)"
    assert issubclass(cls, Backend) and cls.name == name

    pyro.clear_param_store()
    pyro.param("user_param", torch.tensor(1.5))
    rng_before = torch.get_rng_state()
    post = _fit(name, model, x, y, seed=7)
    # The caller's RNG and parameter store are untouched.
    assert torch.equal(torch.get_rng_state(), rng_before), f"{name} moved the global torch RNG"
    assert list(pyro.get_param_store().keys()) == ["user_param"], f"{name} leaked Pyro params"
    assert float(pyro.param("user_param").detach()) == 1.5

    # Same seed, same draws.
    again = _fit(name, model, x, y, seed=7)
    assert post.samples.keys() == again.samples.keys()
    for site, v in post.samples.items():
        assert torch.equal(v, again.samples[site]), f"{name}: seed 7 twice gave different draws of {site}"
    assert post.method == name

    # Predictions: one mean / variance / interval per test point.
    x_test = torch.linspace(-3, 3, 7)[:, None]
    pred = post.predict(x_test)
    assert pred.mean.shape == (7,) and pred.variance.shape == (7,)
    lo, hi = pred.interval(0.9)
    assert lo.shape == hi.shape == (7,) and bool((lo <= hi).all())
    assert pred.log_prob(torch.zeros(7)).shape == (7,)

    # Save / load round trip gives the same posterior and predictions.
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = pbnn.Posterior.load(path, model=model)
    for site, v in post.samples.items():
        assert torch.equal(v, loaded.samples[site])
    assert torch.allclose(loaded.predict(x_test).mean, pred.mean)


@pytest.mark.parametrize("name", NAMES)
def test_backend_model_kinds(name, toy_registered):
    """A hand-written Pyro model: fitted by backends that serve it, refused clearly by the rest."""
    x, y = _data()
    kinds = BACKENDS[name].model_kinds
    assert set(kinds) <= {"bnn", "pyro"} and "bnn" in kinds
    if "pyro" not in kinds:
        with pytest.raises(ValueError, match="needs a pbnn.BNN"):
            _fit(name, _pyro_model, x, y, seed=0)
        return
    post = _fit(name, _pyro_model, x, y, seed=0)
    assert set(post.samples) >= {"w", "sigma"}
    assert bool((post.samples["sigma"] > 0).all())
    assert post.predict(x).mean.shape == (24,)


def test_toy_backend_is_a_sound_sampler():
    """The toy backend is not only well-formed: on a conjugate model it finds the posterior mean."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, generator=g)
    y = 1.5 * x[:, 0] + 0.5 * torch.randn(40, generator=g)
    model = pbnn.BNN(torch.nn.Linear(1, 1, bias=False), likelihood=pbnn.likelihoods.Gaussian(0.5))
    post = pbnn.fit(model, x, y, method=ImportanceResampling(num_proposals=20000, num_samples=2000, scale=1.0, seed=0))
    phi = x[:, 0].double()
    precision = float(phi @ phi) / 0.25 + 1.0
    mean = float(phi @ y.double()) / 0.25 / precision
    assert abs(float(post.samples["weight"].mean()) - mean) < 0.02
    assert abs(float(post.samples["weight"].std()) - precision**-0.5) < 0.01


def test_writing_a_backend_page_runs():
    """The example of docs/writing_a_backend.md is a working backend of under 60 lines."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "writing_a_backend.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) < 60
    try:
        exec(compile(code, "writing_a_backend.md", "exec"), {})
        x, y = _data()
        post = pbnn.fit(_bnn(), x, y, method="sir", num_proposals=500, num_samples=50, seed=0)
        assert post.samples["0.weight"].shape == (1, 50, 6, 1)
    finally:
        BACKENDS.pop("sir", None)
