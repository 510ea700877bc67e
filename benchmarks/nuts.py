"""pbnn NUTS vs plain Pyro NUTS on the same BNN, in the same process: effective samples per second.

Model (as in issue 3): a 1-20-1 tanh net, 100 points, Normal(0, 1) priors on all 61
weights, fixed Gaussian noise 0.1. Both samplers start from the same network
initialisation, use target_accept 0.8 and the same max_tree_depth. The statistic is the
minimum bulk ESS over all weights (ArviZ) divided by wall time, including warm-up.

Both run the same number of warm-up and sampling iterations per chain (default 100 + 100:
plain Pyro NUTS spends milliseconds per leapfrog step and trees of ~256 steps on this
posterior, so longer Pyro runs do not fit in a few minutes on 2 cores). pbnn runs 4 chains
in one vectorised batch with ``compile=True`` (the compilation time counts in its wall
time); Pyro runs one chain. The script prints (1) gradient cost per chain, (2) time per
chain-leapfrog step including everything, and (3) ESS/s, with pbnn's ESS pooled over chains
(the issue's metric) and summed over chains (what a one-chain run measures).

This posterior mixes slowly (step size ~0.003, trees at the cap): ESS from a few hundred
draws is a handful and does NOT grow in proportion to run length, so compare ESS/s only
between runs of equal length; the per-leapfrog ratio is the stable number.

Usage: python benchmarks/nuts.py [--chains 4 --warmup 100 --draws 100 --pyro-warmup W --pyro-draws S]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pbnn
import pbnn  # noqa: E402
import pbnn.kernels.hmc  # noqa: E402


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, 100)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(100, generator=g)
    return x, y


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))


class PyroBNN(PyroModule):
    """The same BNN as a PyroModule, the way the Pyro tutorials write it."""

    def __init__(self, net: torch.nn.Module, sigma: float) -> None:
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](1, 20)
        self.fc2 = PyroModule[torch.nn.Linear](20, 1)
        for layer in (self.fc1, self.fc2):
            layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand(layer.weight.shape).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand(layer.bias.shape).to_event(1))
        self.sigma = sigma

    def forward(self, x, y=None):
        f = self.fc2(torch.tanh(self.fc1(x)))[:, 0]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(f, self.sigma), obs=y)
        return f


def min_ess(samples: dict[str, np.ndarray]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        ess = az.ess(az.from_dict(posterior=samples), method="bulk")
    return float(min(ess[v].values.min() for v in ess.data_vars))


class LeapfrogCounter:
    """Counts leapfrog steps (each chain's step counts once) by wrapping a function of the
    sampler: ``count(args, kwargs, result)`` says how many steps one call made."""

    def __init__(self, module, name: str, count) -> None:
        self.module, self.name, self.count_fn, self.count = module, name, count, 0
        self.original = getattr(module, name)

    def __enter__(self):
        def counted(*a, **k):
            out = self.original(*a, **k)
            self.count += self.count_fn(a, k, out)
            return out

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def _subtree_steps(args, kwargs, sub) -> int:
    # Chains step in lockstep: a subtree costs as many vectorised leaves as its longest chain.
    return int(sub["n"].max()) * sub["n"].shape[0]


def run_pbnn(net, x, y, args):
    model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Gaussian(0.1))
    t = time.perf_counter()
    with LeapfrogCounter(pbnn.kernels.hmc, "_build_subtree", _subtree_steps) as counter:
        post = pbnn.fit(
            model, x, y, method="nuts", num_samples=args.draws, warmup=args.warmup, num_chains=args.chains,
            max_tree_depth=args.max_tree_depth, init="net", init_jitter=0.0 if args.chains == 1 else 0.1,
            seed=0, progress=False, warn=False, compile=args.compile,
        )  # fmt: skip
    wall = time.perf_counter() - t
    ess = min_ess({k: v.numpy() for k, v in post.samples.items()})
    # Chains that settle in different (permuted) modes make the pooled ESS tiny; the summed
    # within-chain ESS is what a one-chain run like Pyro's below measures.
    per_chain = sum(min_ess({k: v[c : c + 1].numpy() for k, v in post.samples.items()}) for c in range(args.chains))
    grads = int(post.sample_stats["n_steps"].max(0).values.sum())  # lockstep: the longest chain's tree
    return {
        "wall": wall, "ess": ess, "ess_chains": per_chain, "grads_per_chain": grads, "post": post,
        "leapfrogs": counter.count, "step_size": post.info["step_size"],
    }  # fmt: skip


def run_pyro(net, x, y, args):
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_value

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = PyroBNN(net, 0.1)
    init = {f"fc{i + 1}.{p}": getattr(net[2 * i], p).detach().clone() for i in range(2) for p in ("weight", "bias")}
    kernel = NUTS(
        model, target_accept_prob=0.8, max_tree_depth=args.max_tree_depth, init_strategy=init_to_value(values=init)
    )
    mcmc = MCMC(kernel, num_samples=args.pyro_draws, warmup_steps=args.pyro_warmup, disable_progbar=not args.progress)
    from pyro.infer.mcmc import nuts as pyro_nuts

    t = time.perf_counter()
    with LeapfrogCounter(pyro_nuts, "velocity_verlet", lambda a, k, out: k.get("num_steps", 1)) as counter:
        mcmc.run(x, y)
    wall = time.perf_counter() - t
    samples = {k: v.numpy()[None] for k, v in mcmc.get_samples().items()}
    return {
        "wall": wall, "ess": min_ess(samples), "draws": args.pyro_draws, "step_size": kernel.step_size,
        "leapfrogs": counter.count,
    }  # fmt: skip


def time_gradient(net, x, y, n=200):
    """Seconds per chain-gradient of the log joint: pbnn's Potential (eager, compiled, 1 and 4
    chains) vs a Pyro trace of the PyroModule."""
    from pyro.infer.mcmc.util import initialize_model
    from pyro.ops.integrator import potential_grad

    model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Gaussian(0.1))
    pot = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
    out = {}
    with pyro.validation_enabled(False):
        for compiled in (False, True):
            fn = pbnn.kernels.hmc.value_and_grad(pot.log_joint_batch, compile=compiled)
            for chains in (1, 4):
                z = pot.initial_z()[None].repeat(chains, 1)
                fn(z), fn(z)  # compile / warm up
                t = time.perf_counter()
                for _ in range(n):
                    fn(z)
                out[("compiled" if compiled else "eager", chains)] = (time.perf_counter() - t) / n / chains
    pyro.set_rng_seed(0)
    init_params, potential_fn, _, _ = initialize_model(PyroBNN(net, 0.1), model_args=(x, y))
    params = {k: v.detach().requires_grad_(True) for k, v in init_params.items()}
    potential_grad(potential_fn, params)
    t = time.perf_counter()
    for _ in range(n // 4):
        potential_grad(potential_fn, params)
    out["pyro"] = (time.perf_counter() - t) / (n // 4)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--pyro-warmup", type=int, default=None, help="default: --warmup (equal-length runs)")
    p.add_argument("--pyro-draws", type=int, default=None, help="default: --draws")
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--compile", type=lambda s: {"true": True, "false": False}.get(s, s), default=True,
                   help="pbnn's compile option: true (default here), false or auto")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny model, no sync overhead)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    args.pyro_warmup = args.warmup if args.pyro_warmup is None else args.pyro_warmup
    args.pyro_draws = args.draws if args.pyro_draws is None else args.pyro_draws
    torch.set_num_threads(args.threads)
    x, y = make_data()
    net = make_net()

    g = time_gradient(copy.deepcopy(net), x, y)
    print("gradient of the log joint, ms per chain (ratio to Pyro's trace):")
    for key in [("eager", 1), ("eager", 4), ("compiled", 1), ("compiled", 4)]:
        print(f"  pbnn Potential {key[0]:8s} {key[1]} chain(s): {g[key] * 1e3:.3f} ms  (x{g['pyro'] / g[key]:.1f})")
    print(f"  Pyro trace of the PyroModule:      {g['pyro'] * 1e3:.3f} ms")

    ours = run_pbnn(copy.deepcopy(net), x, y, args)
    steps = " ".join(f"{float(e):.2g}" for e in ours["step_size"])
    print(
        f"pbnn NUTS: {args.chains} chains x ({args.warmup} warm-up + {args.draws} draws), compile={args.compile}: "
        f"{ours['wall']:.1f} s, {ours['leapfrogs']} chain-leapfrogs, step sizes {steps}, "
        f"min bulk ESS pooled {ours['ess']:.0f}, summed over chains {ours['ess_chains']:.0f}"
    )
    theirs = run_pyro(copy.deepcopy(net), x, y, args)
    print(
        f"Pyro NUTS: 1 chain x ({args.pyro_warmup} warm-up + {args.pyro_draws} draws): {theirs['wall']:.1f} s, "
        f"{theirs['leapfrogs']} leapfrogs, step size {float(theirs['step_size']):.2g}, min bulk ESS {theirs['ess']:.0f}"
    )
    ours_lf = ours["wall"] / ours["leapfrogs"]
    theirs_lf = theirs["wall"] / theirs["leapfrogs"]
    print(
        f"time per chain-leapfrog (everything included): pbnn {ours_lf * 1e3:.3f} ms, Pyro {theirs_lf * 1e3:.3f} ms "
        f"-> x{theirs_lf / ours_lf:.1f}"
    )
    pyro_rate = theirs["ess"] / theirs["wall"]
    print(
        f"ESS/s (the issue's metric; Pyro runs one chain): pbnn pooled "
        f"{ours['ess'] / ours['wall']:.3f} -> x{ours['ess'] / ours['wall'] / pyro_rate:.1f}; pbnn summed within-chain "
        f"{ours['ess_chains'] / ours['wall']:.3f} -> x{ours['ess_chains'] / ours['wall'] / pyro_rate:.1f}; "
        f"Pyro {pyro_rate:.3f}"
    )
    print(
        "Pooled ESS is low when chains sit in different (permuted) modes of the weight posterior; the\n"
        "within-chain sum is what Pyro's single chain measures. Short runs make ESS noisy: the per-leapfrog\n"
        "ratio is the stable number (ESS per leapfrog is a property of NUTS, not of the implementation)."
    )
    try:
        import numpyro  # noqa: F401

        print("NumPyro is installed but this script does not run it yet.")
    except ImportError:
        print("NumPyro not installed: no NumPyro comparison.")


if __name__ == "__main__":
    main()
