"""NUTS on a hand-written Pyro BNN against the same BNN through ``pbnn.BNN``, in one process.

Three fits of a 1-10-1 tanh network (31 weights and a learned noise scale) on
``pbnn.datasets.gap_regression(seed=0)`` (160 points), with the same NUTS settings and seed:
- ``bnn``: ``pbnn.BNN(net)`` with its defaults (Normal(0, 1) on every weight, sigma ~ HalfNormal(1));
- ``pyro_gauss``: the same model written by hand in Pyro (the same priors, so the same posterior);
- ``pyro_heavy``: the issue's non-Gaussian model: sigma ~ HalfCauchy(1), StudentT(3) input
  weights, Laplace(0, 1) output weights.
All use ``compile="auto"`` (so compilation is counted) and one torch thread. Reported: wall time
of ``pbnn.fit`` (MAP warm start, warm-up, sampling, compilation), the leapfrog steps all chains
took in the sampling phase (``sample_stats["n_steps"]``), the wall time per leapfrog step
(whole fit / all leapfrog steps, warm-up included, so an upper bound), the largest R-hat and the
smallest bulk ESS over every latent site (ArviZ), and the mean tree depth.

Usage: python benchmarks/pyro_vs_bnn.py [--chains 2 --warmup 200 --draws 200] [--models bnn,pyro_gauss,pyro_heavy]
"""

from __future__ import annotations

import argparse
import time
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import torch
from pbnn.datasets import gap_regression

import pbnn

H = 10


def _net(x, w1, b1, w2, b2):
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def pyro_gauss(x, y=None, subsample=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(_net(x[i], w1, b1, w2, b2), sigma), obs=None if y is None else y[i])


def pyro_heavy(x, y=None, subsample=None):
    w1 = pyro.sample("w1", dist.StudentT(3.0, 0.0, 1.0).expand([1, H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Laplace(0.0, 1.0).expand([H]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        pyro.sample("obs", dist.Normal(_net(x[i], w1, b1, w2, b2), sigma), obs=None if y is None else y[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--models", default="bnn,pyro_gauss,pyro_heavy", help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    d = gap_regression(seed=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, H), torch.nn.Tanh(), torch.nn.Linear(H, 1))
    models = {"bnn": pbnn.BNN(net), "pyro_gauss": pyro_gauss, "pyro_heavy": pyro_heavy}
    options = dict(num_chains=args.chains, warmup=args.warmup, num_samples=args.draws, seed=0, progress=False)
    print(f"{args.chains} chains x ({args.warmup} + {args.draws}), max_tree_depth default, seed 0, 1 thread")
    print(
        f"{'model':>11} {'wall s':>7} {'leapfrogs':>9} {'ms/leapfrog':>11} {'max R-hat':>9} {'min ESS':>7} {'depth':>5}"
    )
    for name in args.models.split(","):
        model = models[name]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the convergence warning: numbers below
            post = pbnn.fit(model, d["x_train"], d["y_train"], method="nuts", **options)
        wall = time.perf_counter() - t
        stats = post.sample_stats
        steps = int(stats["n_steps"].sum())
        idata = post.to_arviz()
        rhat = float(az.rhat(idata).to_array().max())
        ess = float(az.ess(idata).to_array().min())
        depth = float(stats["tree_depth"].float().mean())
        total = steps * (args.warmup + args.draws) / args.draws  # warm-up steps estimated at the same rate
        print(f"{name:>11} {wall:7.1f} {steps:9d} {1000 * wall / total:11.2f} {rhat:9.2f} {ess:7.0f} {depth:5.1f}")


if __name__ == "__main__":
    main()
