"""Gradient variance and time per step of SVI's estimators (issue 11). Not a test.

On a 2-hidden-layer MLP (100 units, batch 128) fitted to synthetic regression data:

1. the variance of the ELBO gradient with respect to the guide's parameters, over repeated
   draws at FIXED guide parameters (taken from a default-length plain-reparam fit), for
   estimator="reparam", "local_reparam" and "flipout", as ratios to plain
   reparameterisation: once redrawing the minibatch and the noise, once on one minibatch;
2. the time per SVI step of pbnn's SVI with each estimator, as ratios to a hand-written
   reparameterised Bayes-by-backprop loop on the same net (same ELBO estimator, Adam with
   the same schedule and clipping), and to hand-written loops with the same estimator,
   interleaved in the same process so load hits all alike.

Run from the repository root:  python -m benchmarks.svi_variance  [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pbnn.data
import pyro
import torch
from pyro.distributions import constraints
from torch import nn
from torch.distributions import biject_to
from torch.nn import functional as F

import pbnn
from pbnn.infer import SVI

HIDDEN, BATCH, N, D_IN, NOISE = 100, 128, 4096, 8, 0.3


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.sin(x[:, 0] * 2) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] + NOISE * torch.randn(N, generator=g)
    return x, (y - y.mean()) / y.std()


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def make_model() -> pbnn.BNN:
    # Fixed noise scale so the hand-written loop and pbnn optimise the same ELBO.
    return pbnn.BNN(make_net(), prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Gaussian(NOISE))


# ------------------------------------------------------------------ gradient variance
def gradient_variance(x, y, fit_steps: int, repeats: int) -> dict[str, dict[str, float]]:
    model = make_model()
    potential = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
    post = pbnn.fit(model, x, y, method="svi", num_steps=fit_steps, batch_size=BATCH, seed=0, progress=False)
    q = post.approximation.q.base_dist
    print(f"guide after {fit_steps} plain-reparam steps: median weight sd {q.scale.median():.3g}")
    out = {}
    for est in ("reparam", "local_reparam", "flipout"):
        svi = SVI(estimator=est, batch_size=BATCH)
        with pyro.get_param_store().scope():
            guide = svi._make_guide(potential)
            loss, _, _ = svi._objective(potential, guide)
            with torch.no_grad():
                guide.loc.copy_(q.loc)
                guide.scale_unconstrained.copy_(biject_to(constraints.softplus_positive).inv(q.scale))
            for mode in ("random minibatch", "fixed minibatch"):
                torch.manual_seed(1)
                fixed_idx = torch.randperm(N)[:BATCH]
                grads = []
                for _ in range(repeats):
                    idx = torch.randperm(N)[:BATCH] if mode == "random minibatch" else fixed_idx
                    g = torch.autograd.grad(loss(idx), [guide.loc, guide.scale_unconstrained])
                    grads.append(torch.cat([t.flatten() for t in g]))
                var = torch.stack(grads).var(0)
                dim = q.loc.numel()
                out[mode, est] = {"loc": var[:dim].sum().item(), "scale": var[dim:].sum().item()}
    return out


# ------------------------------------------------------------------ time per step
class HandBBB:
    """Bayes by backprop written out: mean-field Gaussian over every weight, one weight sample
    per minibatch, ELBO = (N/B) log-lik + log prior - log q at the sample."""

    def __init__(self, x, y, lr=0.01, num_steps=1000, estimator="reparam"):
        self.estimator = estimator
        net = make_net()
        self.x, self.y = x, y
        self.shapes = [p.shape for p in net.parameters()]
        self.loc = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
        # softplus(rho) = 1e-3, pbnn's initial guide scale
        self.rho = [torch.full_like(p, math.log(math.expm1(1e-3))).requires_grad_(True) for p in self.loc]
        params = self.loc + self.rho
        self.params = params
        self.opt = torch.optim.Adam(params, lr=lr)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.1 ** (1.0 / num_steps))

    def step(self, idx):
        self.opt.zero_grad(set_to_none=True)
        xb, yb = self.x[idx], self.y[idx]
        log_q = log_prior = 0.0
        ws = []
        for m, r in zip(self.loc, self.rho):
            s = F.softplus(r)
            eps = torch.randn_like(m)
            w = m + s * eps
            ws.append(w)
            log_q = log_q + (-0.5 * eps**2 - torch.log(s)).sum()
            log_prior = log_prior + (-0.5 * w**2).sum()
        h = xb
        for i in range(0, len(ws), 2):
            if self.estimator == "reparam":
                h = F.linear(h, ws[i], ws[i + 1])
            else:
                mw, mb = self.loc[i], self.loc[i + 1]
                if self.estimator == "local_reparam":
                    sw, sb = F.softplus(self.rho[i]), F.softplus(self.rho[i + 1])
                    var = F.linear(h * h, sw * sw, sb * sb)
                    h = F.linear(h, mw, mb) + var.sqrt() * torch.randn_like(var)
                else:  # flipout from the same weight sample
                    s_in = torch.randint(0, 2, h.shape, dtype=h.dtype).mul_(2).sub_(1)
                    pert = F.linear(h * s_in, ws[i] - mw, ws[i + 1] - mb)
                    s_out = torch.randint(0, 2, pert.shape, dtype=h.dtype).mul_(2).sub_(1)
                    h = F.linear(h, mw, mb) + pert * s_out
            if i + 2 < len(ws):
                h = F.relu(h)
        ll = (-0.5 * ((yb - h[:, 0]) / NOISE) ** 2).sum()
        loss = -(N / idx.shape[0] * ll + log_prior - log_q)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.opt.step()
        self.sched.step()
        return loss.item()


def time_hand(x, y, steps, estimator="reparam"):
    bbb = HandBBB(x, y, num_steps=steps, estimator=estimator)
    gen = torch.Generator().manual_seed(0)
    idxs = [torch.randperm(N, generator=gen)[:BATCH] for _ in range(steps)]
    t = time.perf_counter()
    for idx in idxs:
        bbb.step(idx)
    return (time.perf_counter() - t) / steps


def time_pbnn(x, y, estimator, steps):
    """Per-step time from two fits of different length (cancels setup and final draws)."""
    times = []
    for s in (steps, 2 * steps):
        svi = SVI(estimator=estimator, batch_size=BATCH, num_steps=s, num_samples=10, seed=0, progress=False)
        model = make_model()
        t = time.perf_counter()
        pbnn.fit(model, x, y, method=svi)
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = make_data()
    fit_steps, repeats, steps, rounds = (300, 50, 100, 1) if args.quick else (3000, 300, 300, 3)

    print(f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-1 ReLU, N={N}, batch {BATCH}, torch threads {args.threads}")
    var = gradient_variance(x, y, fit_steps, repeats)
    print(f"\nELBO gradient variance (sum over guide parameters, {repeats} draws; ratio = reparam / estimator)")
    print("  random minibatch: the minibatch and the weight noise redrawn each time (what SGD sees);")
    print("  fixed minibatch: only the weight noise redrawn (the part the estimators change).")
    for mode in ("random minibatch", "fixed minibatch"):
        print(f"{mode:>18} {'var(d/d loc)':>14} {'ratio':>7} {'var(d/d scale)':>15} {'ratio':>7}")
        base = var[mode, "reparam"]
        for est in ("reparam", "local_reparam", "flipout"):
            v = var[mode, est]
            print(
                f"{est:>18} {v['loc']:14.4g} {base['loc'] / v['loc']:6.1f}x {v['scale']:15.4g} "
                f"{base['scale'] / v['scale']:6.1f}x"
            )

    print(f"\nTime per SVI step ({rounds} interleaved rounds, medians), ratio to the hand-written reparam loop")
    print("and to a hand-written loop with the same estimator:")
    ests = ("reparam", "local_reparam", "flipout")
    hand = {k: [] for k in ests}
    ours = {k: [] for k in ests}
    for _ in range(rounds):
        for est in ests:
            hand[est].append(time_hand(x, y, steps, est))
            ours[est].append(time_pbnn(x, y, est, steps))
    ref = statistics.median(hand["reparam"])
    for est in ests:
        h, m = statistics.median(hand[est]), statistics.median(ours[est])
        print(
            f"{est:>14}: pbnn {1e3 * m:6.2f} ms/step, hand-written {1e3 * h:6.2f} ms/step;  "
            f"pbnn / hand reparam {m / ref:5.2f}x,  pbnn / hand same estimator {m / h:5.2f}x"
        )


if __name__ == "__main__":
    main()
