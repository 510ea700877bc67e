# %% [markdown]
# # Cyclical SGLD on the 25-Gaussian mixture
#
# The toy of Zhang, Li, Zhang, Chen & Wilson (ICLR 2020): an equal-weight mixture of 25
# Gaussians with means on {-4, -2, 0, 2, 4}^2 and covariance 0.03 I, gradients corrupted by
# N(0, I) noise, a start uniform in [-10, 10]^2. With the same number of gradient steps,
# SGLD with a decaying step size (0.043, then 0.043 (t - 500)^-0.55) settles in a few modes;
# cyclical SGLD (alpha_0 = 0.07, 30 cycles) restarts its step size and visits all of them.
# The samplers are pbnn's pure update functions; run with `python tutorials/sgmcmc_mixture.py`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pbnn.kernels.sgmcmc import cyclical_cosine, is_exploration, polynomial_decay, sgld_step  # noqa: E402

grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
centres = torch.cartesian_prod(grid, grid)
QUICK = os.environ.get("PBNN_QUICK") == "1"  # smoke run: fewer steps, same code
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
var, steps, cycles = 0.03, 5_000 if QUICK else 50_000, 30


def grad_u(x):
    """-grad log p of the mixture: softmax-weighted pulls towards the centres."""
    d = x[None, :] - centres
    w = torch.softmax(-0.5 * (d * d).sum(1) / var, 0)
    return (w[:, None] * d).sum(0) / var


def run(cyclical, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = -10 + 20 * torch.rand(2, generator=g, dtype=torch.float64)
    kept = []
    for t in range(1, steps + 1):
        grad = grad_u(x) + torch.randn(2, generator=g, dtype=torch.float64)
        xi = torch.randn(2, generator=g, dtype=torch.float64)
        if cyclical:
            explore = is_exploration(t, steps, cycles, 50 / 1667)  # the reference: 50 noise-free steps per cycle
            x = sgld_step(x, grad, cyclical_cosine(t, 0.07, steps, cycles), 1, 1.0, None if explore else xi)
            if not explore:
                kept.append(x)
        else:
            lr = 0.043 if t <= 500 else polynomial_decay(t - 500, 0.043, 0.0, 0.55)
            kept.append(x := sgld_step(x, grad, lr, 1, 1.0, xi))
    return torch.stack(kept)


# %%
samples = {"SGLD": run(False), "cSGLD": run(True)}
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
for ax, (name, s) in zip(axes, samples.items()):
    modes = int((torch.cdist(s, centres).min(0).values < 0.5).sum())
    ax.scatter(s[::10, 0], s[::10, 1], s=1, alpha=0.3)
    ax.scatter(centres[:, 0], centres[:, 1], c="r", marker="x", s=20)
    ax.set_title(f"{name}: {modes} of 25 modes visited")
    ax.set_xlim(-6, 6)
    ax.set_ylim(-6, 6)
    print(f"{name}: {modes} of 25 modes visited")
fig.tight_layout()
fig.savefig(OUT / "sgmcmc_mixture.png", dpi=120)
print(f"wrote {OUT / 'sgmcmc_mixture.png'}")
