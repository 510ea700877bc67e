# %% [markdown]
# # The Pyro-syntax path: a hand-written model with a hierarchical prior
#
# `pbnn.fit` takes any Pyro model that follows one convention: signature
# `model(x, y=None, subsample=None)`, observations at the site `"obs"` inside
# `pyro.plate("data", len(x), subsample=subsample)`. Here: a one-hidden-layer network
# whose weight scale `tau` has its own prior, written directly in Pyro.

# %%
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import arviz as az
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch

import pbnn
from pbnn.datasets import gap_regression

QUICK = os.environ.get("PBNN_QUICK") == "1"
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
warnings.simplefilter("ignore", FutureWarning)
H = 20


def model(x, y=None, subsample=None):
    tau = pyro.sample("tau", dist.HalfNormal(1.0))  # shared scale of the hidden weights
    w1 = pyro.sample("w1", dist.Normal(0.0, tau).expand([1, H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0 / H**0.5).expand([H]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        f = torch.tanh(x[i] @ w1 + b1) @ w2
        pyro.sample("obs", dist.Normal(f, sigma), obs=None if y is None else y[i])


# %%
d = gap_regression(seed=0)
post = pbnn.fit(
    model,
    d["x_train"],
    d["y_train"],
    method="svi",
    guide="low_rank",
    num_steps=300 if QUICK else 3000,
    lr=0.02,
    num_samples=200,
    seed=0,
    progress=False,
)
pred = post.predict(d["x_test"], num_samples=50 if QUICK else 200)
print("test NLL", pbnn.metrics.nll(pred, d["y_test"]), " coverage_90", pbnn.metrics.coverage(pred, d["y_test"]))

# %%
idata = post.to_arviz()
print(az.summary(idata, var_names=["tau", "sigma"], kind="stats"))
lo, hi = pred.interval(0.9)
plt.figure(figsize=(5, 3.5))
plt.fill_between(d["x_test"][:, 0], lo, hi, alpha=0.3, label="90% interval")
plt.plot(d["x_test"][:, 0], pred.mean, label="mean")
plt.scatter(d["x_train"][:, 0], d["y_train"], s=4, c="k")
plt.legend()
plt.tight_layout()
plt.savefig(OUT / "pyro_syntax.png", dpi=100)
print(f"wrote {OUT / 'pyro_syntax.png'}")
