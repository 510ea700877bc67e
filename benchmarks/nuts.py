"""pbnn NUTS against Pyro NUTS (``jit_compile=True``) and NumPyro NUTS on the same posteriors.

Two posteriors (the same data, priors and starting point for every sampler):
- ``logistic``: logistic regression, 5 features + bias, 200 points, Normal(0, 1) priors: a
  posterior whose ESS is close to the number of draws, so ESS per gradient compares samplers.
- ``bnn``: the issue's 1-20-1 tanh BNN, 100 points, Normal(0, 1) priors on all 61 weights,
  fixed Gaussian noise 0.1: a slowly mixing posterior (trees at the cap, ESS a handful), the
  second row.

Each sampler runs in its own fresh process (so every compile cost is counted):
- pbnn: ``pbnn.fit(method="nuts")`` with the default ``compile="auto"``, 4 chains in one
  vectorised batch, once with a cold torch compile cache (a new empty ``TORCHINDUCTOR_CACHE_DIR``)
  and once warm (the same directory again, in a new process).
- Pyro: ``pyro.infer.NUTS(jit_compile=True)``, one chain, shorter by default (``--pyro-warmup``,
  ``--pyro-draws``), because Pyro costs milliseconds per leapfrog step.
- NumPyro (optional): 4 chains, ``chain_method="vectorized"``, in a separate virtual
  environment: ``python -m venv /tmp/npvenv && /tmp/npvenv/bin/pip install numpyro`` and pass
  ``--numpyro-python /tmp/npvenv/bin/python``.

Reported per run: wall time including compilation; steady-state seconds per chain-leapfrog
(sampling phase only: its wall time over the leapfrog steps its chains took; NumPyro compiles
its sampling loop at the start of that phase, so its steady state is timed on a repeat); minimum bulk
ESS over all parameters (ArviZ, pooled over chains) and ESS per 1000 gradients (sampling
phase); then the ratios of pbnn to NumPyro (else to Pyro). One torch / XLA thread per process.

Usage: python benchmarks/nuts.py [--models logistic,bnn] [--chains 4 --warmup 500 --draws 500]
       [--pyro-warmup 100 --pyro-draws 100] [--numpyro-python PATH] [--skip-pyro]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- problems (numpy only)
def make_problem(name: str) -> dict:
    """Data and a starting point shared by every sampler (numpy, seed 0)."""
    rng = np.random.default_rng(0)
    if name == "logistic":
        x = rng.standard_normal((200, 5)).astype(np.float32)
        w = np.array([1.0, -0.5, 0.25, 0.0, 0.75], dtype=np.float32)
        y = (rng.random(200) < 1 / (1 + np.exp(-(x @ w + 0.3)))).astype(np.float32)
        init = {"w": rng.normal(0, 0.1, (1, 5)), "b": rng.normal(0, 0.1, (1,))}
    elif name == "bnn":
        x = np.linspace(-2, 2, 100, dtype=np.float32)[:, None]
        y = (np.sin(2 * x[:, 0]) + 0.1 * rng.standard_normal(100)).astype(np.float32)
        init = {
            "w1": rng.uniform(-1, 1, (20, 1)),
            "b1": rng.uniform(-1, 1, (20,)),
            "w2": rng.uniform(-0.2, 0.2, (1, 20)),
            "b2": rng.uniform(-0.2, 0.2, (1,)),
        }
    else:
        raise ValueError(f"unknown model {name!r}: logistic or bnn")
    return {"x": x, "y": y, "init": {k: v.astype(np.float32) for k, v in init.items()}}


# ---------------------------------------------------------------------------- workers
def run_pbnn(problem: dict, args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))  # this checkout's pbnn
    import pbnn
    import pbnn.kernels.hmc as hmc

    torch.set_num_threads(1)
    x, y = torch.as_tensor(problem["x"]), torch.as_tensor(problem["y"])
    p = {k: torch.as_tensor(v) for k, v in problem["init"].items()}
    if args.model == "logistic":
        net = torch.nn.Linear(5, 1)
        pairs = [(net.weight, p["w"]), (net.bias, p["b"])]
        likelihood = pbnn.likelihoods.Bernoulli()
    else:
        net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
        pairs = [(net[0].weight, p["w1"]), (net[0].bias, p["b1"]), (net[2].weight, p["w2"]), (net[2].bias, p["b2"])]
        likelihood = pbnn.likelihoods.Gaussian(0.1)
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=likelihood)
    marks = {}
    adapt = hmc.adapt

    def timed_adapt(state, warm, info, it, **kw):  # the last warm-up iteration ends the warm-up phase
        out = adapt(state, warm, info, it, **kw)
        if it == kw["warmup"] - 1:
            marks["warmup_end"] = time.perf_counter()
        return out

    hmc.adapt = timed_adapt
    t = time.perf_counter()
    post = pbnn.fit(
        model, x, y, method="nuts", num_samples=args.draws, warmup=args.warmup, num_chains=args.chains,
        max_tree_depth=args.max_tree_depth, init="net", init_jitter=0.0, seed=0, progress=False, warn=False,
        compile=args.compile,
    )  # fmt: skip
    end = time.perf_counter()
    steps = post.sample_stats["n_steps"]
    draws = {k: v.reshape(v.shape[0], v.shape[1], -1).numpy() for k, v in post.samples.items()}
    return {
        "wall": end - t, "sampling": end - marks.get("warmup_end", t), "grads": int(steps.sum()),
        "draws": draws, "step_size": [float(e) for e in post.info["step_size"]],
    }  # fmt: skip


def run_pyro(problem: dict, args) -> dict:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_value
    from pyro.infer.mcmc import nuts as pyro_nuts

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    x, y = torch.as_tensor(problem["x"]), torch.as_tensor(problem["y"])
    init = {k: torch.as_tensor(v) for k, v in problem["init"].items()}

    def model(x, y=None):
        s = {k: pyro.sample(k, dist.Normal(0.0, 1.0).expand(v.shape).to_event(v.dim())) for k, v in init.items()}
        if args.model == "logistic":
            f = (x @ s["w"].T + s["b"])[:, 0]
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Bernoulli(logits=f), obs=y)
        else:
            f = (torch.tanh(x @ s["w1"].T + s["b1"]) @ s["w2"].T + s["b2"])[:, 0]
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(f, 0.1), obs=y)

    kernel = NUTS(
        model, target_accept_prob=0.8, max_tree_depth=args.max_tree_depth, jit_compile=True,
        ignore_jit_warnings=True, init_strategy=init_to_value(values=init),
    )  # fmt: skip
    count, marks = [0], {}
    original = pyro_nuts.velocity_verlet

    def counted(*a, **k):
        count[0] += k.get("num_steps", 1)
        return original(*a, **k)

    def hook(kernel, samples, stage, i):
        if stage == "Warmup" and i == args.pyro_warmup - 1:
            marks["warmup_end"], marks["warmup_steps"] = time.perf_counter(), count[0]

    pyro_nuts.velocity_verlet = counted
    mcmc = MCMC(kernel, num_samples=args.pyro_draws, warmup_steps=args.pyro_warmup, hook_fn=hook, disable_progbar=True)
    t = time.perf_counter()
    mcmc.run(x, y)
    end = time.perf_counter()
    draws = {k: v.reshape(1, v.shape[0], -1).numpy() for k, v in mcmc.get_samples().items()}
    return {
        "wall": end - t, "sampling": end - marks["warmup_end"], "grads": count[0] - marks["warmup_steps"],
        "draws": draws, "step_size": [float(kernel.step_size)],
    }  # fmt: skip


def run_numpyro(problem: dict, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, init_to_value

    numpyro.set_host_device_count(1)
    x, y = jnp.asarray(problem["x"]), jnp.asarray(problem["y"])
    init = {k: jnp.asarray(v) for k, v in problem["init"].items()}

    def model(x, y=None):
        s = {k: numpyro.sample(k, dist.Normal(0.0, 1.0).expand(v.shape).to_event(v.ndim)) for k, v in init.items()}
        if args.model == "logistic":
            f = (x @ s["w"].T + s["b"])[:, 0]
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", dist.Bernoulli(logits=f), obs=y)
        else:
            f = (jnp.tanh(x @ s["w1"].T + s["b1"]) @ s["w2"].T + s["b2"])[:, 0]
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", dist.Normal(f, 0.1), obs=y)

    kernel = NUTS(
        model, target_accept_prob=0.8, max_tree_depth=args.max_tree_depth, init_strategy=init_to_value(values=init)
    )
    mcmc = MCMC(kernel, num_warmup=args.warmup, num_samples=args.draws, num_chains=args.chains,
                chain_method="vectorized", progress_bar=False)  # fmt: skip
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    mcmc.warmup(key, x, y, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.last_state)
    mcmc.run(mcmc.post_warmup_state.rng_key, x, y, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.get_samples())
    end = time.perf_counter()
    steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    samples = mcmc.get_samples(group_by_chain=True)
    draws = {k: np.asarray(v).reshape(v.shape[0], v.shape[1], -1) for k, v in samples.items()}
    # The sampling loop is a second jitted function (compiled inside the run above): time the
    # steady state on a repeat of the sampling phase from where it ended.
    mcmc.post_warmup_state = mcmc.last_state
    t2 = time.perf_counter()
    mcmc.run(mcmc.post_warmup_state.rng_key, x, y, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.get_samples())
    steady = time.perf_counter() - t2
    steady_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    return {
        "wall": end - t, "sampling": steady * steps / max(steady_steps, 1), "grads": steps, "draws": draws,
        "step_size": [],
    }  # fmt: skip


WORKERS = {"pbnn": run_pbnn, "pyro": run_pyro, "numpyro": run_numpyro}


def worker(args) -> None:
    out = WORKERS[args.worker](make_problem(args.model), args)
    np.savez(args.out, **{f"draw:{k}": v for k, v in out.pop("draws").items()})
    Path(args.out + ".json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------- parent
def launch(python: str, which: str, args, env: dict | None = None) -> dict:
    """Run one worker in a fresh process; its draws, wall times and gradient counts."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        cmd = [python, __file__, "--worker", which, "--model", args.model, "--out", out]
        for name in ("chains", "warmup", "draws", "pyro_warmup", "pyro_draws", "max_tree_depth", "compile"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        environ = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
            **(env or {}),
        }
        subprocess.run(cmd, check=True, env=environ)
        result = json.loads(Path(out + ".json").read_text())
        with np.load(out + ".npz") as f:
            result["draws"] = {k.split(":", 1)[1]: f[k] for k in f.files}
    return result


def min_ess(draws: dict[str, np.ndarray]) -> float:
    import warnings

    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = az.ess(az.from_dict(posterior=draws), method="bulk")
    return float(min(ess[v].values.min() for v in ess.data_vars))


def report(name: str, r: dict) -> dict:
    r["ess"] = min_ess(r["draws"])
    r["per_leapfrog"] = r["sampling"] / max(r["grads"], 1)
    r["ess_per_grad"] = r["ess"] / max(r["grads"], 1)
    print(
        f"  {name:18s} wall {r['wall']:7.1f} s | steady {r['per_leapfrog'] * 1e3:7.3f} ms/chain-leapfrog | "
        f"{r['grads']:8d} sampling gradients | min bulk ESS {r['ess']:7.1f} | "
        f"ESS/1000 grads {r['ess_per_grad'] * 1e3:6.2f}",
        flush=True,
    )
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="logistic,bnn")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--pyro-warmup", type=int, default=100)
    p.add_argument("--pyro-draws", type=int, default=100)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--compile", default="auto", help="pbnn's compile option: auto (default), True or False")
    p.add_argument("--numpyro-python", default=None, help="python of a virtual environment with numpyro installed")
    p.add_argument("--skip-pyro", action="store_true")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.compile = {"True": True, "False": False}.get(args.compile, args.compile)
    if args.worker:
        return worker(args)
    for model in args.models.split(","):
        args.model = model
        print(f"{model}: {args.chains} chains x ({args.warmup} warm-up + {args.draws} draws), max_tree_depth "
              f"{args.max_tree_depth}; Pyro 1 chain x ({args.pyro_warmup} + {args.pyro_draws})")  # fmt: skip
        runs = {}
        with tempfile.TemporaryDirectory() as cache:
            for state in ("cold", "warm"):
                env = {"TORCHINDUCTOR_CACHE_DIR": cache}
                runs[f"pbnn ({state} cache)"] = report(
                    f"pbnn ({state} cache)", launch(sys.executable, "pbnn", args, env)
                )
        if not args.skip_pyro:
            runs["pyro jit"] = report("Pyro (jit_compile)", launch(sys.executable, "pyro", args))
        if args.numpyro_python:
            runs["numpyro"] = report("NumPyro", launch(args.numpyro_python, "numpyro", args))
        base_name = "numpyro" if "numpyro" in runs else "pyro jit" if "pyro jit" in runs else None
        if base_name is None:
            continue
        base = runs[base_name]
        for name in ("pbnn (cold cache)", "pbnn (warm cache)"):
            r = runs[name]
            print(
                f"  {name} / {base_name}: steady per chain-leapfrog x{r['per_leapfrog'] / base['per_leapfrog']:.2f}, "
                f"ESS per gradient x{r['ess_per_grad'] / max(base['ess_per_grad'], 1e-12):.2f}"
                + (f", wall x{r['wall'] / base['wall']:.2f}" if base_name == "numpyro" else "")
            )


if __name__ == "__main__":
    main()
