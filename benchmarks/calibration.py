"""Calibration of MAP vs Bayesian backends on a 3-class problem, before and after temperature scaling.

Run: ``python benchmarks/calibration.py [--out DIR] [--steps N]``. Data: three interleaved
2-D spirals with label noise (train 300, validation 300, test 2000 points), a 2-50-50-3
tanh network with a N(0, 1) prior. Every registered backend among MAP, SVI
(mean-field and low-rank guides) and, when installed, Laplace / NUTS / SWAG / SGLD is fitted
with its defaults; the temperature is fitted on the validation split. Prints one table of
test metrics (accuracy, NLL, Brier, ECE, adaptive ECE) per method, before and after
temperature scaling, and writes reliability diagrams. Not a timed test.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pbnn.plots
import torch
from pbnn.calibration import TemperatureScaling

import pbnn


def spirals(n: int, seed: int, noise: float = 0.25, flip: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Three interleaved spiral arms in 2-D, Gaussian jitter and a fraction ``flip`` of random labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    t = torch.rand(n, generator=g) * 1.5 + 0.25  # position along the arm
    angle = 2 * math.pi * (t + y / 3.0)
    r = 2 * t
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1) + noise * torch.randn(n, 2, generator=g)
    flipped = torch.rand(n, generator=g) < flip
    y = torch.where(flipped, torch.randint(0, 3, (n,), generator=g), y)
    return x / 2.0, y


def make_model() -> pbnn.BNN:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50), torch.nn.Tanh(), torch.nn.Linear(50, 3)
    )
    return pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Categorical())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="calibration-benchmark-output")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps (default: each backend's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr = spirals(300, seed=0)
    x_va, y_va = spirals(300, seed=1)
    x_te, y_te = spirals(2000, seed=2)
    steps = {} if args.steps is None else {"num_steps": args.steps}
    candidates = {
        "map": ("map", steps),
        "svi-mf": ("svi", {"guide": "mean_field", **steps}),
        "svi-lr": ("svi", {"guide": "low_rank", **steps}),
        "laplace": ("laplace", {}),
        "nuts": ("nuts", {}),
        "swag": ("swag", {}),
        "sgld": ("sgld", {}),
    }
    rows, temps = {}, {}
    for name, (method, options) in candidates.items():
        if method not in pbnn.infer.BACKENDS:
            continue
        print(f"fitting {name} ...", flush=True)
        t0 = time.perf_counter()
        post = pbnn.fit(make_model(), x_tr, y_tr, method=method, seed=0, progress=False, **options)
        fit_s = time.perf_counter() - t0
        ts = TemperatureScaling().fit(post.predict(x_va), y_va)
        pred = post.predict(x_te)
        cal = ts(pred)
        temps[name] = ts.temperature
        keys = ("accuracy", "nll", "brier", "ece", "adaptive_ece")
        before, after = pbnn.evaluate(pred, None, y_te), pbnn.evaluate(cal, None, y_te)
        rows[name] = {k: before[k] for k in keys} | {"T": ts.temperature, "fit_s": fit_s}
        rows[name + " +TS"] = {k: after[k] for k in keys}
        pbnn.plots.reliability_diagram(pred, y_te, title=f"{name}: ECE {before['ece']:.3f}", path=out / f"{name}.png")
        pbnn.plots.reliability_diagram(
            cal,
            y_te,
            title=f"{name} + TS (T={ts.temperature:.2f}): ECE {after['ece']:.3f}",
            path=out / f"{name}_ts.png",
        )
    print("\n" + pbnn.metrics.table(rows))
    print(f"\nreliability diagrams written to {out.resolve()}/")
    return rows


if __name__ == "__main__":
    main()
