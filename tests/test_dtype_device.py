"""Every backend runs on the dtype and device of the model and data (issue 26, item 2).

A float64 network (``net.double()``) on float64 data must give float64 draws, predictions,
metrics, ArviZ arrays and saved / loaded posteriors, on the data's device. A tensor pbnn
creates with the default dtype shows up here the way a tensor created on the default device
would on a GPU: the same fit under ``torch.set_default_dtype(torch.float64)`` must give
bit-identical numbers, because nothing may depend on the default. The ``device`` fixture adds
``"cuda"`` wherever a GPU exists (CI has none: those cases are skipped there).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.core.data import as_tensor, validate
from pbnn.engine import chains, distributed
from pbnn.engine.optim import seeded
from pbnn.infer.base import BACKENDS
from pbnn.kernels import mh as mh_kernel

F64 = torch.float64

# Options that make each backend fast on a tiny problem.
FAST = {
    "svi": {"num_steps": 20, "num_samples": 10},
    "map": {"num_steps": 20},
    "laplace": {"map_steps": 20, "num_samples": 10},
    "nuts": {"num_samples": 5, "warmup": 5, "num_chains": 2, "init": "net", "warn": False, "max_tree_depth": 4},
    "hmc": {"num_samples": 5, "warmup": 5, "num_chains": 2, "init": "net", "warn": False, "num_leapfrog_steps": 4},
    "mh": {"num_samples": 5, "warmup": 5, "num_chains": 2, "init": "net", "warn": False},
    "sgld": {"num_samples": 5, "warmup": 5},
    "sghmc": {"num_samples": 5, "warmup": 5},
    "psgld": {"num_samples": 5, "warmup": 5},
    "csgld": {"num_samples": 4, "map_steps": 10},
    "csghmc": {"num_samples": 4, "map_steps": 10},
    "ensemble": {"num_members": 2, "num_steps": 20, "bootstrap": True},
    "swa": {"start": 10, "num_steps": 20},
    "swag": {"start": 10, "num_steps": 20, "num_samples": 5},
    "multiswag": {"num_members": 2, "start": 10, "num_steps": 20, "num_samples": 5},
    "fge": {"map_steps": 10, "num_cycles": 2, "cycle_length": 6},
    "mc-dropout": {"num_steps": 20, "num_samples": 5},
    "dropconnect": {"num_steps": 20, "num_samples": 5},
}
PYRO_BACKENDS = sorted(n for n, cls in BACKENDS.items() if "pyro" in cls.model_kinds)
CLASSIFIERS = ["laplace", "mc-dropout", "sgld", "svi", "swag"]


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def device(request) -> torch.device:
    return torch.device(request.param)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _data(device, classes: int = 0):
    x = torch.linspace(-2, 2, 24, dtype=F64, device=device)[:, None]
    y = (x[:, 0] > 0).long() + (x[:, 0] > 1).long() if classes else torch.sin(2 * x[:, 0])
    return x, y


def _bnn(device, classes: int = 0) -> pbnn.BNN:
    torch.manual_seed(0)  # the same float32 initialisation whatever the default dtype: made, then cast
    with default_dtype(torch.float32):
        net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, classes or 1))
    lik = pbnn.likelihoods.Categorical() if classes else pbnn.likelihoods.Gaussian(scale="learned")
    return pbnn.BNN(net.double().to(device), likelihood=lik)


def _pyro_model(x, y=None, subsample=None):
    """A hand-written model that builds its constants in the data's dtype and device."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("data", len(x), subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(w * x[i, 0], sigma), obs=None if y is None else y[i])


def _fit(name, model, x, y, **extra):
    # A Pyro model's starting point (init_to_median) is drawn from the caller's RNG when the
    # potential is built, outside the fit's seed: fix that state too.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of deliberately short runs
        return pbnn.fit(model, x, y, method=name, progress=False, seed=3, **{**FAST.get(name, {}), **extra})


def _check(what: str, t, device) -> None:
    assert isinstance(t, torch.Tensor), f"{what}: {type(t).__name__}, not a tensor"
    if t.is_floating_point():
        assert t.dtype == F64, f"{what} is {t.dtype}, not float64"
    assert t.device.type == device.type, f"{what} is on {t.device}, not {device}"


def _outputs(post, x, y) -> dict[str, torch.Tensor]:
    """Every number a user reads off a posterior, with the predictive's summaries."""
    pred = post.predict(x)
    out = {f"samples[{k}]": v for k, v in post.samples.items()}
    out.update({f"fixed[{k}]": v for k, v in post.fixed.items()})
    out["log_prob"] = pred.log_prob(y)
    if pred.is_classification:
        out.update(probs=pred.probs, entropy=pred.entropy, mutual_information=pred.mutual_information)
    else:
        lo, hi = pred.interval(0.9)
        out.update(mean=pred.mean, variance=pred.variance, lower=lo, upper=hi)
    return out


def _check_posterior(post, x, y, device, tmp_path) -> dict:
    out = _outputs(post, x, y)
    for what, t in out.items():
        _check(what, t, device)
    metrics = pbnn.evaluate(post, x, y)
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    idata = post.to_arviz()
    for k in post.samples:
        assert idata.posterior[k].dtype == np.float64, f"to_arviz: {k} is {idata.posterior[k].dtype}"
    assert idata.log_likelihood["obs"].dtype == np.float64

    path = tmp_path / "post.pt"
    post.save(path)
    loaded = pbnn.Posterior.load(path, model=post.model, map_location=device)
    for k, v in post.samples.items():
        _check(f"loaded samples[{k}]", loaded.samples[k], device)
        assert torch.equal(loaded.samples[k], v)
    again = _outputs(loaded, x, y)
    for what, t in out.items():
        assert torch.allclose(again[what], t, rtol=1e-12, atol=1e-12), f"{what} changed after save / load"
    return {**out, **{f"metric {k}": torch.tensor(v, dtype=F64) for k, v in metrics.items()}}


def _same(a: dict, b: dict, label: str) -> None:
    for what in a:
        assert torch.equal(a[what].nan_to_num(), b[what].nan_to_num()), (
            f"{label}: {what} depends on torch's default dtype (a tensor made without dtype=)"
        )


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_float64(name, device, tmp_path):
    """Regression: float64 everywhere on the data's device, and no dependence on the default dtype."""
    x, y = _data(device)
    out = _check_posterior(_fit(name, _bnn(device), x, y), x, y, device, tmp_path)
    with default_dtype(torch.float64):
        again = _outputs(_fit(name, _bnn(device), x, y), x, y)
    _same(again, out, name)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_float64(name, device, tmp_path):
    x, y = _data(device, classes=3)
    out = _check_posterior(_fit(name, _bnn(device, classes=3), x, y), x, y, device, tmp_path)
    with default_dtype(torch.float64):
        again = _outputs(_fit(name, _bnn(device, classes=3), x, y), x, y)
    _same(again, out, name)


@pytest.mark.parametrize("name", PYRO_BACKENDS)
def test_pyro_model_float64(name, device, tmp_path):
    """A hand-written Pyro model keeps its data's float64 (data are never cast to the default dtype)."""
    x, y = _data(device)
    extra = {"bootstrap": False} if name == "ensemble" else {}  # bootstrap weights need a pbnn.BNN
    post = _fit(name, _pyro_model, x, y, **extra)
    assert post.data.x.dtype == F64
    out = _check_posterior(post, x, y, device, tmp_path)
    with default_dtype(torch.float64):
        again = _outputs(_fit(name, _pyro_model, x, y, **extra), x, y)
    _same(again, out, name)


def test_data_follow_the_model():
    """A BNN's float data take its parameters' dtype and device (arrays and lists too); integer
    labels stay integers; a Pyro model's tensors keep their dtype, arrays get the default."""
    model64, model32 = _bnn("cpu"), pbnn.BNN(torch.nn.Linear(1, 1))
    x64, y64 = np.linspace(-1, 1, 5)[:, None], np.zeros(5)
    assert validate(model64, x64, y64).x.dtype == F64 and validate(model64, x64, y64).y.dtype == F64
    assert validate(model64, x64.tolist(), [0, 1, 0, 1, 0]).y.dtype == F64  # integer regression targets
    assert validate(model32, torch.from_numpy(x64), torch.from_numpy(y64)).x.dtype == torch.float32
    data = validate(_bnn("cpu", classes=3), torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]))
    assert data.x.dtype == F64 and data.y.dtype == torch.long
    assert validate(_pyro_model, torch.from_numpy(x64), torch.from_numpy(y64)).x.dtype == F64
    assert validate(_pyro_model, x64, y64).x.dtype == torch.get_default_dtype()
    assert as_tensor([1, 2], "x", float_only=True).dtype == torch.get_default_dtype()
    assert as_tensor(torch.zeros(2, dtype=torch.float16), "x", like=torch.zeros(1, dtype=F64)).dtype == F64


def test_data_move_to_the_model_device(device):
    """CPU data (tensors or arrays) for a BNN on ``device`` go there; so do inputs to ``predict``."""
    model = _bnn(device)
    data = validate(model, torch.zeros(4, 1), np.zeros(4))
    _check("x", data.x, device)
    _check("y", data.y, device)
    post = _fit("map", model, torch.linspace(-1, 1, 8)[:, None], torch.zeros(8))
    _check("mean", post.predict(np.zeros((3, 1))).mean, device)


def test_bnn_constants_follow_the_network():
    """Prior and likelihood constants take the network's dtype; the caller's likelihood is not cast."""
    lik = pbnn.likelihoods.Gaussian(scale=0.5)
    model = pbnn.BNN(torch.nn.Linear(2, 1).double(), likelihood=lik)
    assert model.prior.scale.dtype == F64 and model.likelihood.scale.dtype == F64
    assert lik.scale.dtype == torch.float32
    same = pbnn.likelihoods.Gaussian(scale=0.5)
    kept = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=same).likelihood  # a copy (BNN owns its likelihood)
    assert kept.scale.dtype == torch.float32 and float(kept.scale) == 0.5


def test_load_map_location(device, tmp_path):
    """``Posterior.load(path, map_location=...)`` puts draws and the fitted approximation there."""
    x, y = _data("cpu")
    model = _bnn("cpu")
    post = _fit("laplace", model, x, y, subset="all", hessian="kfac")
    post.save(tmp_path / "p.pt")
    model.to(device)
    loaded = pbnn.Posterior.load(tmp_path / "p.pt", model=model, map_location=device)
    for k, v in loaded.samples.items():
        _check(f"samples[{k}]", v, device)
        assert torch.equal(v.cpu(), post.samples[k])
    fresh = loaded.approximation.sample(3, seed=0)
    for k, v in fresh.items():
        _check(f"fresh draws[{k}]", v, device)
        if device.type == "cpu":  # the CUDA generator draws other numbers than the CPU's
            assert torch.equal(v, post.approximation.sample(3, seed=0)[k])
    mean = loaded.predict(x.to(device)).mean
    _check("mean", mean, device)
    assert torch.allclose(mean.cpu(), post.predict(x).mean, atol=1e-10)


def test_seeded_forks_and_restores_the_rng(device):
    """``seeded`` gives the same draws on the device for the same seed and leaves the caller's
    CPU and (once CUDA is in use) CUDA random streams where they were."""
    torch.zeros(1, device=device)  # CUDA in use from here on
    state = torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
    with seeded(5):
        a = torch.randn(3, device=device)
    with seeded(5):
        b = torch.randn(3, device=device)
    after = torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
    assert torch.equal(a, b) and torch.equal(after, state)
    assert distributed.rng_devices() == ([torch.cuda.current_device()] if device.type == "cuda" else [])


def test_generators_live_on_the_model_device(device):
    gen = chains.chain_generator(device)
    assert gen.device.type == device.type
    z = torch.zeros(2, 3, dtype=F64, device=device)
    state = mh_kernel.init(lambda z: -(z**2).sum(-1), z)
    new, info = mh_kernel.step(state, lambda z: -(z**2).sum(-1), gen)
    _check("z", new.z, device)
    _check("acceptance_rate", info["acceptance_rate"], device)


def test_local_cuda_device_from_torchrun_env():
    """Under torchrun with NCCL each rank takes GPU ``LOCAL_RANK``; other backends leave the device alone."""
    assert distributed.local_cuda_device("nccl", {"LOCAL_RANK": "3", "RANK": "7"}) == 3
    assert distributed.local_cuda_device("nccl", {}) == 0
    assert distributed.local_cuda_device("gloo", {"LOCAL_RANK": "3"}) is None


def test_data_parallel_sets_the_rank_device(monkeypatch):
    """pbnn's process-group set-up calls ``torch.cuda.set_device(LOCAL_RANK)`` before an NCCL group."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    with distributed.data_parallel():
        pass
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    with distributed.data_parallel(backend="gloo"):
        pass
    assert calls == [("init", "gloo")]
