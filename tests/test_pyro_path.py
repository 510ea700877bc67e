"""Hand-written Pyro models go through the same fit / Posterior / predictive path."""

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pbnn
from pbnn.infer.base import BACKENDS


def hierarchical_model(x, y=None, subsample=None):
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(0.0, tau).expand([2]).to_event(1))
    offset = pyro.param("offset", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(x[i] @ w + offset, 0.2), obs=None if y is None else y[i])


def full_batch_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, 0.2), obs=y)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    return x, x @ torch.tensor([1.0, -2.0]) + 0.5 + 0.2 * torch.randn(60, generator=g)


def test_svi_on_a_hand_written_model(data):
    x, y = data
    post = pbnn.fit(
        hierarchical_model, x, y, method="svi", num_steps=1500, lr=0.02, num_samples=200, seed=0, progress=False
    )
    assert set(post.samples) == {"tau", "w"}
    assert post.fixed["offset"].item() == pytest.approx(0.5, abs=0.1)
    assert torch.allclose(post.samples["w"].mean((0, 1)), torch.tensor([1.0, -2.0]), atol=0.1)
    pred = post.predict(x[:5], num_samples=50)
    assert pred.mean.shape == (5,)
    assert torch.allclose(pred.mean, x[:5] @ torch.tensor([1.0, -2.0]) + 0.5, atol=0.4)
    idata = post.to_arviz()
    assert idata.log_likelihood["obs"].shape == (4, 50, 60)  # 200 independent draws: 4 chains of 50


def test_seed_alone_makes_a_hand_written_fit_reproducible(data):
    """The starting point does not depend on the caller's random state: seed= is enough."""
    x, y = data
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        post = pbnn.fit(hierarchical_model, x, y, method="sgld", num_samples=5, warmup=5, seed=3, progress=False)
        runs.append(post.samples["w"])
    assert torch.equal(runs[0], runs[1])


def test_minibatch_needs_subsample_argument(data):
    x, y = data
    with pytest.raises(ValueError, match="subsample"):
        pbnn.fit(full_batch_model, x, y, method="svi", batch_size=10, num_steps=5, progress=False)
    post = pbnn.fit(full_batch_model, x, y, method="map", num_steps=500, lr=0.05, seed=0, progress=False)
    assert post.samples["w"].shape == (1, 1, 2)


# ---------------------------------------------------------------- the support table (docs/model.md)
def heavy_tailed_net(x, y=None, subsample=None):
    """A 1-3-1 network with non-Gaussian priors: HalfCauchy noise, StudentT and Laplace weights."""
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    w1 = pyro.sample("w1", dist.StudentT(3.0, 0.0, 1.0).expand([1, 3]).to_event(2))
    w2 = pyro.sample("w2", dist.Laplace(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(torch.tanh(x[i] @ w1) @ w2, sigma), obs=None if y is None else y[i])


# A few steps each: the table test checks that a backend runs and predicts, not its accuracy.
FAST = {
    "map": {"num_steps": 5},
    "svi": {"num_steps": 5, "num_samples": 4},
    "mh": {"num_samples": 4, "warmup": 4, "num_chains": 1, "map_steps": 2},
    "nuts": {"num_samples": 3, "warmup": 3, "num_chains": 1, "map_steps": 2, "max_tree_depth": 3},
    "hmc": {"num_samples": 3, "warmup": 3, "num_chains": 1, "map_steps": 2, "num_leapfrog_steps": 3},
    "laplace": {"map_steps": 5, "num_samples": 4, "refine": False},
    "ensemble": {"num_members": 2, "num_steps": 3},
    "swa": {"map_steps": 2, "num_steps": 6, "collect_every": 2},
    "swag": {"map_steps": 2, "num_steps": 6, "collect_every": 2, "num_samples": 3},
    "multiswag": {"num_members": 2, "map_steps": 2, "num_steps": 6, "collect_every": 2, "num_samples": 2},
    "fge": {"map_steps": 2, "num_cycles": 2, "cycle_length": 2},
    "mc-dropout": {"num_steps": 3},
    "dropconnect": {"num_steps": 3},
}
SGMCMC = {"num_samples": 3, "warmup": 3, "num_chains": 1, "map_steps": 2}


def _support_table() -> list[tuple[str, dict, str, str]]:
    """Rows ``(method, options, bnn, pyro)`` of the support table in docs/model.md."""
    text = (Path(__file__).parent.parent / "docs" / "model.md").read_text()
    rows = []
    for line in text.split("### Which backend serves which model")[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        options = {k: ast.literal_eval(v) for k, v in re.findall(r"(\w+)=([^`]+)", cells[1])}
        rows.append((cells[0].strip("`"), options, cells[2], cells[3]))
    return rows


def test_support_table_lists_every_backend():
    rows = _support_table()
    assert {m for m, _, _, _ in rows} == set(BACKENDS)
    assert all(bnn == "yes" and pyro in ("yes", "no") for _, _, bnn, pyro in rows)
    for name, cls in BACKENDS.items():  # a backend that refuses every hand-written model says so in model_kinds
        serves = any(p == "yes" for m, opts, _, p in rows if m == name and not opts)
        assert serves == ("pyro" in cls.model_kinds), name


@pytest.mark.parametrize("method, options, pyro_support", [(m, o, p) for m, o, _, p in _support_table()])
def test_support_table_holds(method, options, pyro_support):
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 20)[:, None]
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(20, generator=g)
    opts = {**FAST.get(method, SGMCMC), **options, "seed": 0, "progress": False}
    if pyro_support == "no":
        with pytest.raises(ValueError, match="pbnn.BNN"):
            pbnn.fit(heavy_tailed_net, x, y, method=method, **opts)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few steps: convergence warnings are expected
        post = pbnn.fit(heavy_tailed_net, x, y, method=method, **opts)
    assert {"sigma", "w1", "w2"} <= set(post.samples)
    assert post.samples["w1"].shape[2:] == (1, 3)
    assert bool((post.samples["sigma"] > 0).all())
    pred = post.predict(x[:4])
    assert pred.mean.shape == (4,) and torch.isfinite(pred.mean).all()


# ---------------------------------------------------------------- import pbnn (issue 29 item 5)
def test_import_pbnn_makes_every_documented_module_available():
    """Every ``pbnn.<module>`` (and ``pbnn.<package>.<module>``) the README, docs and tutorials
    write resolves by attribute access after a bare ``import pbnn``, in a fresh process."""
    root = Path(__file__).parent.parent
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "tutorials").glob("*.py")]
    dotted = set()
    for f in files:
        dotted |= set(re.findall(r"\bpbnn(?:\.[a-z_][a-z0-9_]*)+", f.read_text()))
    modules = set()
    for name in dotted:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            try:
                if importlib.util.find_spec(".".join(parts[:i])) is None:
                    break
            except ModuleNotFoundError:  # the parent is a module, not a package
                break
            modules.add(".".join(parts[:i]))
    assert {"pbnn.bench", "pbnn.metrics", "pbnn.priors", "pbnn.infer", "pbnn.engine.optim"} <= modules
    code = (
        "import functools, sys, pbnn\n"
        f"missing = [m for m in {sorted(modules)!r} if not hasattr(functools.reduce("
        "lambda o, a: getattr(o, a, None), m.split('.')[1:-1], pbnn), m.split('.')[-1])]\n"
        "print(missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- Pyro's own results (issue 29 item 3)
def _mcmc(kernel, x, y, num_samples=30, warmup=30):
    mcmc = pyro.infer.MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(x, y)
    return mcmc


def test_from_pyro_wraps_an_mcmc_run(data):
    x, y = data
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mcmc = _mcmc(pyro.infer.NUTS(full_batch_model), x, y)
    post = pbnn.Posterior.from_pyro(mcmc)
    assert post.method == "pyro:NUTS" and post.samples["w"].shape == (1, 30, 2)
    assert torch.equal(post.samples["w"][0], mcmc.get_samples()["w"])
    assert post.sample_stats["diverging"].shape == (1, 30)
    pred = post.predict(x[:5])
    ref = (x[:5] @ mcmc.get_samples()["w"].T).mean(1)  # the model's mean, averaged over the draws
    assert torch.allclose(pred.mean, ref, atol=1e-5)
    idata = post.to_arviz()
    assert idata.log_likelihood["obs"].shape == (3, 10, 60)  # one chain of 30 draws: split into 3 chains of 10
    assert 0.0 <= pbnn.metrics.coverage(post.predict(x), y) <= 1.0


def test_az_from_pyro_reads_pbnn_sgmcmc_kernels(data):
    import arviz as az

    from pbnn.infer.sgmcmc import SGLDKernel

    x, y = data
    mcmc = _mcmc(SGLDKernel(hierarchical_model, lr=1e-3, seed=0), x, y, num_samples=20, warmup=20)
    assert mcmc.diagnostics()["divergences"] == {"chain 0": []}
    idata = az.from_pyro(mcmc, log_likelihood=False)  # KeyError 'divergences' before
    assert idata.posterior["w"].shape == (1, 20, 2)
    assert not idata.sample_stats["diverging"].values.any()
    post = pbnn.Posterior.from_pyro(mcmc)
    assert post.method == "pyro:SGLDKernel" and set(post.fixed) == {"offset"}
    assert post.predict(x[:3]).mean.shape == (3,)


def test_from_pyro_wraps_a_fitted_guide(data):
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

    x, y = data
    for guide_type in (AutoNormal, AutoDiagonalNormal):
        with pyro.get_param_store().scope(), torch.random.fork_rng():
            torch.manual_seed(0)
            guide = guide_type(hierarchical_model)
            svi = pyro.infer.SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
            for _ in range(150):
                svi.step(x, y)
            post = pbnn.Posterior.from_pyro(guide, x=x, y=y, num_samples=100)
            offset = float(pyro.param("offset").detach())
        assert post.method == f"pyro:{guide_type.__name__}"
        assert post.samples["w"].shape == (1, 100, 2) and post.samples["tau"].shape == (1, 100)
        assert post.fixed["offset"].item() == pytest.approx(offset)  # the model's param, not the guide's
        assert torch.allclose(post.samples["w"].mean((0, 1)), torch.tensor([1.0, -2.0]), atol=0.15)
        assert (post.approximation is not None) == (guide_type is AutoDiagonalNormal)
        assert post.predict(x[:4], num_samples=20).mean.shape == (4,)
    assert post.predict(x[:4], num_samples=200).num_draws == 200  # more draws from the guide
    with pytest.raises(ValueError, match="training data"):
        pbnn.Posterior.from_pyro(guide)
    with pytest.raises(TypeError, match="pyro.infer.MCMC"):
        pbnn.Posterior.from_pyro(object())


# ---------------------------------------------------------------- save / load across processes (issue 29 item 4)
MODEL_MODULE = """
import pyro, pyro.distributions as dist, torch

def model(x, y=None, subsample=None):
    s = pyro.sample("s", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.StudentT(3.0, 0.0, 1.0).expand([2]).to_event(1))
    b = pyro.param("b", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(x[i] @ w + b, s), obs=None if y is None else y[i])
"""
LOAD = """
import torch, pbnn
from hand_model import model
for method in ("laplace", "ensemble"):
    post = pbnn.Posterior.load(f"{method}.pt", model=model)
    assert post.method == method, post.method
    assert torch.equal(post.predict(post.data.x[:3]).mean, torch.load(f"{method}.mean.pt")), method
print("ok")
"""


def test_hand_written_posterior_saves_and_loads_across_processes(tmp_path, monkeypatch):
    """Saved here from the model of a module file, loaded in a fresh process that imports it."""
    (tmp_path / "hand_model.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    model = importlib.import_module("hand_model").model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    y = x @ torch.tensor([1.0, -1.0]) + 0.5 + 0.2 * torch.randn(30, generator=g)
    options = {"laplace": {"map_steps": 30, "num_samples": 8}, "ensemble": {"num_members": 2, "num_steps": 10}}
    for method, opts in options.items():
        post = pbnn.fit(model, x, y, method=method, progress=False, seed=0, **opts)
        post.save(tmp_path / f"{method}.pt")
        torch.save(post.predict(x[:3]).mean, tmp_path / f"{method}.mean.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(pbnn.__file__).parent.parent)])}
    out = subprocess.run(
        [sys.executable, "-c", LOAD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
