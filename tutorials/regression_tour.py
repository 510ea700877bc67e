# %% [markdown]
# # 1-D regression tour: every backend on data with a gap
#
# Each backend pbnn has fits the same BNN (1-50-1 tanh, Normal(0, 1) prior, learned
# noise) to 1-D data with no inputs in (-0.8, 0.8). A good posterior widens its
# predictive band in the gap; a point estimate does not. Run as a plain script:
# `python tutorials/regression_tour.py` (set `PBNN_QUICK=1` for a fast smoke run).
# Figures go to `tutorials/output/`.

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from pbnn.bench import QUICK_OPTIONS, _options_for
from pbnn.datasets import gap_regression

import pbnn

QUICK = os.environ.get("PBNN_QUICK") == "1"
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
warnings.simplefilter("ignore", FutureWarning)

# %% [markdown]
# ## Data and model

# %%
d = gap_regression(seed=0)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0), likelihood=pbnn.likelihoods.Gaussian(scale="learned"))

# %% [markdown]
# ## One backend per family, with its defaults (short runs in quick mode)
#
# MAP (baseline), SVI and Laplace (approximation), NUTS (MCMC), SGHMC (SG-MCMC), and
# deep ensembles, SWAG and MC dropout (imitation). So that the whole tour runs in under two
# minutes on two CPU cores, three backends get shorter runs than their defaults: NUTS
# (2 chains of 100 draws after 100 warmup steps, trees of depth <= 5; the NUTS tutorial runs
# it properly), SGHMC (300 draws instead of 1000) and the ensemble (3 members instead of
# 5). Each line prints the fit and predict time.

# %%
methods = ["map", "svi", "laplace", "nuts", "sghmc", "ensemble", "swag", "mc-dropout"]
tour_options = {
    "nuts": {"num_samples": 100, "warmup": 100, "num_chains": 2, "max_tree_depth": 5},
    "sghmc": {"num_samples": 300},
    "ensemble": {"num_members": 3},
}
preds = {}
for method in methods:
    base = QUICK_OPTIONS if QUICK else {"progress": False, **tour_options.get(method, {})}
    options = _options_for(method, base)
    start = time.perf_counter()
    post = pbnn.fit(model, d["x_train"], d["y_train"], method=method, seed=0, **options)
    pred = post.predict(d["x_test"])
    preds[method] = pred
    nll, gap_sd = pbnn.metrics.nll(pred, d["y_test"]), float(pred.stddev[d["in_gap"]].mean())
    print(
        f"{method:>12}: test NLL {nll:7.3f}   mean predictive sd in the gap {gap_sd:.3f}   "
        f"({time.perf_counter() - start:.1f} s)"
    )

# %% [markdown]
# ## Predictive bands

# %%
cols = 3
fig, axes = plt.subplots(
    (len(preds) + cols - 1) // cols,
    cols,
    figsize=(4 * cols, 3 * ((len(preds) + cols - 1) // cols)),
    squeeze=False,
    sharey=True,
)
xs = d["x_test"][:, 0]
for ax, (method, pred) in zip(axes.flat, preds.items()):
    lo, hi = pred.interval(0.9)
    ax.fill_between(xs, lo, hi, alpha=0.3)
    ax.plot(xs, pred.mean, lw=1.5)
    ax.scatter(d["x_train"][:, 0], d["y_train"], s=4, c="k")
    ax.axvspan(-0.8, 0.8, color="grey", alpha=0.1)
    ax.set_title(method)
for ax in list(axes.flat)[len(preds) :]:
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "regression_tour.png", dpi=100)
print(f"wrote {OUT / 'regression_tour.png'}")
