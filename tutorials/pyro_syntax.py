# %% [markdown]
# # The Pyro-syntax path: a hand-written model with a hierarchical prior
#
# `pbnn.fit` takes any Pyro model that follows one convention: signature
# `model(x, y=None, subsample=None)`, observations at the site `"obs"` inside
# `pyro.plate("data", len(x), subsample=subsample)`. Here: a one-hidden-layer network
# whose input-weight scale `tau` has its own prior, written directly in Pyro, twice: in the
# centred form (`w1 ~ Normal(0, tau)`) and the non-centred form (`w1 = tau * w1_raw`,
# `w1_raw ~ Normal(0, 1)`). They are the same model; the posterior geometry is not. In the
# centred form `tau` and `w1` are tightly coupled (Neal's funnel), which a Gaussian guide
# cannot follow, and SVI settles on a small `tau`: a smoother, underfitting network. The
# non-centred form decouples them, as it does for HMC.

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
from pbnn.datasets import gap_regression

import pbnn

QUICK = os.environ.get("PBNN_QUICK") == "1"
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
warnings.simplefilter("ignore", FutureWarning)
H = 20


def centred(x, y=None, subsample=None):
    tau = pyro.sample("tau", dist.HalfNormal(3.0))  # shared scale of the input weights
    w1 = pyro.sample("w1", dist.Normal(0.0, tau).expand([1, H]).to_event(2))
    return _rest(x, y, subsample, w1)


def noncentred(x, y=None, subsample=None):
    tau = pyro.sample("tau", dist.HalfNormal(3.0))
    w1_raw = pyro.sample("w1_raw", dist.Normal(0.0, 1.0).expand([1, H]).to_event(2))
    return _rest(x, y, subsample, tau * w1_raw)  # the same prior on w1, reparameterised


def _rest(x, y, subsample, w1):
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        f = torch.tanh(x[i] @ w1 + b1) @ w2
        pyro.sample("obs", dist.Normal(f, sigma), obs=None if y is None else y[i])


# %% [markdown]
# ## Fit both forms with SVI (a low-rank Gaussian guide)

# %%
d = gap_regression(seed=0)
preds, idatas = {}, {}
for name, model in [("centred", centred), ("non-centred", noncentred)]:
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
    preds[name] = pred = post.predict(d["x_test"], num_samples=50 if QUICK else 200)
    idatas[name] = post.to_arviz()
    nll, cov = pbnn.metrics.nll(pred, d["y_test"]), pbnn.metrics.coverage(pred, d["y_test"])
    print(f"{name:>12}: test NLL {nll:.3f}  90% coverage {cov:.2f}")

# %% [markdown]
# ## The posterior of the hyper-parameters (ArviZ)
#
# The non-centred fit finds a larger weight scale `tau` (about 7 against 1.5) and a smaller
# noise `sigma`, and roughly halves the test NLL (0.18 against 0.33). Both still put `sigma`
# well above the data's true noise (0.1): on 160 points a Gaussian guide trades some fit for
# a smaller KL term, the usual underfitting of variational BNNs; `method="nuts"` on the
# non-centred model is the asymptotically exact (and slower) reference.

# %%
for name, idata in idatas.items():
    print(name)
    print(az.summary(idata, var_names=["tau", "sigma"], kind="stats"))

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
for ax, (name, pred) in zip(axes, preds.items()):
    lo, hi = pred.interval(0.9)
    ax.fill_between(d["x_test"][:, 0], lo, hi, alpha=0.3, label="90% interval")
    ax.plot(d["x_test"][:, 0], pred.mean, label="mean")
    ax.scatter(d["x_train"][:, 0], d["y_train"], s=4, c="k")
    ax.set_title(f"{name}: test NLL {pbnn.metrics.nll(pred, d['y_test']):.2f}")
axes[0].legend()
fig.tight_layout()
fig.savefig(OUT / "pyro_syntax.png", dpi=100)
print(f"wrote {OUT / 'pyro_syntax.png'}")

# %% [markdown]
# ## Laplace and SWAG on the same hand-written model
#
# Laplace and SWAG need no network either: Laplace is Pyro's `AutoLaplaceApproximation` (a
# Gaussian over every latent site in the unconstrained space, at the mode, with the exact
# Hessian there; `docs/laplace.md`), SWAG a Gaussian fitted to SGD iterates over the same latent
# vector. At a network's mode the exact Hessian is often not positive definite; pbnn then warns
# and uses its absolute eigenvalues (there is no network for a Gauss-Newton fallback).

# %%
for method, options in [
    ("laplace", {"map_steps": 300 if QUICK else 3000, "lr": 0.02, "num_samples": 200}),
    ("swag", {"map_steps": 300 if QUICK else 3000, "num_steps": 400 if QUICK else 4000, "num_samples": 30}),
]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the indefinite-Hessian note, kept in post.info
        post = pbnn.fit(noncentred, d["x_train"], d["y_train"], method=method, seed=0, progress=False, **options)
    pred = post.predict(d["x_test"], num_samples=50 if QUICK else 200)
    nll, cov = pbnn.metrics.nll(pred, d["y_test"]), pbnn.metrics.coverage(pred, d["y_test"])
    print(f"{method:>12}: test NLL {nll:.3f}  90% coverage {cov:.2f}  ({post.info.get('hessian', '')})")

# %% [markdown]
# ## Non-Gaussian priors through NUTS, Laplace, SWAG and SGHMC, compared with ArviZ
#
# Nothing above needed Gaussian priors. Here is the model of issue 29: a heavy-tailed noise
# scale `sigma ~ HalfCauchy(1)`, StudentT(3) input weights (a few large weights are cheap,
# so units can be sharp), Laplace output weights (sparsity: unused units are pushed to zero).
# Every backend that needs no network runs on it through the same potential: NUTS (the
# compiled sampler, `sigma` sampled as `log sigma` through Pyro's transform), Laplace (the
# exact Hessian over all latent sites), SWAG (SGD iterates over the same latent vector) and
# SGHMC. Their exports have the same groups, so `az.compare` ranks them by PSIS-LOO and
# `az.plot_ppc` overlays their simulated data sets on the observed `y`.

# %%
K = 10  # hidden units: 31 weights and sigma, small enough for NUTS in a tutorial


def heavy(x, y=None, subsample=None):
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    w1 = pyro.sample("w1", dist.StudentT(3.0, 0.0, 1.0).expand([1, K]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
    w2 = pyro.sample("w2", dist.Laplace(0.0, 1.0).expand([K]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample=subsample) as i:
        f = torch.tanh(x[i] @ w1 + b1) @ w2 + b2
        pyro.sample("obs", dist.Normal(f, sigma), obs=None if y is None else y[i])


HEAVY = {
    # Full mode: 2 chains x (200 + 200) with trees up to 64 leapfrog steps (about two minutes).
    "nuts": {"num_chains": 2, "warmup": 30 if QUICK else 200, "num_samples": 30 if QUICK else 200}
    | {"max_tree_depth": 4 if QUICK else 6},
    "laplace": {"map_steps": 300 if QUICK else 3000, "lr": 0.02, "num_samples": 60 if QUICK else 400},
    "swag": {
        "map_steps": 300 if QUICK else 3000,
        "num_steps": 600 if QUICK else 6000,
        "num_samples": 30 if QUICK else 100,
    },
    "sghmc": {"num_samples": 60 if QUICK else 400, "warmup": 200 if QUICK else 2000, "thinning": 5 if QUICK else 10},
}
heavy_idata = {}
for method, options in HEAVY.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        post = pbnn.fit(heavy, d["x_train"], d["y_train"], method=method, seed=0, progress=False, **options)
    heavy_idata[method] = post.to_arviz()
    pred = post.predict(d["x_test"], num_samples=50 if QUICK else 200)
    nll, cov = pbnn.metrics.nll(pred, d["y_test"]), pbnn.metrics.coverage(pred, d["y_test"])
    print(f"{method:>8}: test NLL {nll:.3f}  90% coverage {cov:.2f}  {post.info.get('wall_time', 0):.0f} s")
    for w in caught:
        print("          warning:", str(w.message)[:150])
print(az.summary(heavy_idata["nuts"], var_names=["sigma"], kind="all"))

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # Pareto-k warnings; the `warning` column keeps them
    warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ's Pareto fit on degenerate weights
    comparison = az.compare(heavy_idata, ic="loo")
print(comparison[["rank", "elpd_loo", "p_loo", "elpd_diff", "dse", "warning"]])

fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, (method, idata) in zip(axes, heavy_idata.items()):
    az.plot_ppc(idata, num_pp_samples=30, ax=ax, legend=ax is axes[0])
    ax.set_title(f"plot_ppc: {method}")
fig.tight_layout()
fig.savefig(OUT / "pyro_syntax_ppc.png", dpi=90)
plt.close("all")
print(f"wrote {OUT / 'pyro_syntax_ppc.png'}")

# %% [markdown]
# How to read it. NUTS is the reference: its R-hat and ESS say whether it is one (with 2
# chains of 200 draws on a 32-dimensional multimodal posterior, R-hat of `sigma` near 1 is
# the check that matters; the weights' R-hat is large for the permutation reason of the NUTS
# tutorial). SGHMC explores one mode with stochastic gradients and comes next; SWAG's
# Gaussian fitted to SGD iterates is narrower and trails. Laplace is last, often with
# `elpd_loo` of `nan` or far below the others: at the mode the exact Hessian of this network
# has eigenvalues near zero or below (pbnn warns and uses their absolute values), so the
# Gaussian is extremely wide along flat directions and some draws predict wildly. LOO's
# Pareto `k` (above 0.7, the `warning` column) flags exactly this: the draws do not form a
# usable posterior sample. For a `pbnn.BNN`, Laplace has the GGN to fall back on; for a
# hand-written model there is no network to build it from, so prefer NUTS, SGHMC or an
# ensemble there. `az.plot_ppc` makes the same point visually.
#
# Time (`benchmarks/pyro_vs_bnn.py`, docs/mcmc.md "Hand-written models against pbnn.BNN",
# busy 2-core machine): NUTS with 2 chains x (100 + 100) on a 1-10-1 network took 69 s for
# this hand-written model and 64 s for its Gaussian-prior twin, against 78 s for the same
# network through `pbnn.BNN` (0.70, 0.63 and 0.77 ms per leapfrog step). A hand-written fit
# run after a `pbnn.BNN` NUTS fit in the same process was 5x slower (396 s): not yet
# diagnosed.
