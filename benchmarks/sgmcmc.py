"""Time per SG-MCMC gradient step on a pbnn.BNN against a plain torch.optim.SGD step.

Net: 10 -> 100 -> 100 -> 1 tanh MLP, batch 128 of N = 4096 points. Each SG-MCMC step is a
kernel step (minibatch draw, log joint on pbnn.potential.Potential, gradient, update,
divergence check), eager and with ``compile=True`` (the gradient as one torch.compile'd
graph; the one-off compilation time is printed separately). Run:
``python benchmarks/sgmcmc.py``; prints ratios to the SGD step measured in the same process
(target <= 1.3x).
"""

from __future__ import annotations

import argparse
import time

import torch

import pbnn
from pbnn.infer.sgmcmc import CyclicalSGLDKernel, SGHMCKernel, SGLDKernel


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 100), torch.nn.Tanh(), torch.nn.Linear(100, 100), torch.nn.Tanh(), torch.nn.Linear(100, 1)
    )


def per_step(fn, n=300, repeat=5):
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def fit_seconds(method: str, steps: int, x, y, batch: int, thinning: int = 10) -> tuple[float, int]:
    """Wall time of a default ``pbnn.fit`` of about ``steps`` gradient steps (set-up and
    compilation included) and the steps it took."""
    transitions = max(steps // thinning, 4)
    if method.startswith("c"):  # cyclical: half of each of the 4 cycles samples
        opts = {"num_samples": transitions // 2, "cycle_length": steps // 4, "init": "net"}
    else:
        opts = {"num_samples": transitions // 2, "warmup": transitions - transitions // 2}
    t = time.perf_counter()
    post = pbnn.fit(pbnn.BNN(make_net()), x, y, method=method, thinning=thinning, batch_size=batch, progress=False,
                    seed=0, **opts)  # fmt: skip
    return time.perf_counter() - t, post.info["gradient_steps"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit-steps", type=int, default=20_000)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 10, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(4096, generator=g)
    batch = 128

    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    batches = pbnn.engine.optim.batch_indices(len(x), batch, g)

    def sgd_step():
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x[idx])[:, 0], y[idx])
        loss.backward()
        opt.step()

    if args.fit_steps:
        for steps in (args.fit_steps, 600):
            for method in ("sgld", "sghmc", "csgld"):
                wall, done = fit_seconds(method, steps, x, y, batch)
                t = time.perf_counter()
                for _ in range(done):
                    sgd_step()
                sgd = time.perf_counter() - t
                print(f"default {method} fit of {done} steps: {wall:6.1f} s, {done} SGD steps {sgd:6.1f} s: "
                      f"x{wall / sgd:.2f}", flush=True)  # fmt: skip

    base = per_step(sgd_step)
    print(f"torch.optim.SGD step: {base * 1e6:8.1f} us")
    model = pbnn.BNN(make_net())
    for compiled in (False, True):
        kernels = {
            "SGLD": SGLDKernel(model, 1e-4, batch_size=batch, seed=0, compile=compiled),
            "SGHMC": SGHMCKernel(model, 1e-5, batch_size=batch, seed=0, compile=compiled),
            "cSGLD": CyclicalSGLDKernel(
                model, 1e-4, batch_size=batch, cycle_length=1000, num_cycles=4, seed=0, compile=compiled
            ),
        }
        for name, k in kernels.items():
            k.setup(0, x, y)

            def step(k=k):  # one gradient step of pbnn.kernels.sgmcmc.transition
                z, aux, i, _ = k._state
                i += 1
                lr, noisy = k._sched.lr(i), not k._sched.exploring(i)
                grad = k._grad(z)
                noise = torch.randn(z.shape, generator=k._generator) if noisy else None
                with torch.no_grad():
                    z, aux = k._rule.update(z, aux, grad, lr, noise)
                torch.isfinite(z).all()  # the divergence check
                k._state = k._state._replace(z=z, aux=aux, step=i, lr=lr)

            t0 = time.perf_counter()
            step()  # with compile=True: compilation happens here (reported, not in the step time)
            first = time.perf_counter() - t0
            t = per_step(step)
            mode = "compiled" if compiled else "eager"
            print(f"{name:>6} {mode:8s}: {t * 1e6:8.1f} us, ratio to SGD {t / base:5.2f}x (first call {first:.1f} s)")
    print(f"torch.optim.SGD step again: {per_step(sgd_step) * 1e6:8.1f} us (load drift check)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
