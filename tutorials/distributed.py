# %% [markdown]
# # Data-parallel SVI and parallel NUTS chains with torchrun
#
# Run with `torchrun --standalone --nproc_per_node=2 tutorials/distributed.py`; as a plain
# `python tutorials/distributed.py` it runs the same code in one process. Every rank fits
# the same model on the same data with the same seed. For SVI each rank takes its share of
# every minibatch and the gradients are all-reduced; for NUTS each rank runs its block of
# chains and the draws are gathered. Either way all ranks end with one, complete Posterior.

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from pbnn.datasets import gap_regression

import pbnn

QUICK = os.environ.get("PBNN_QUICK") == "1"
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
warnings.simplefilter("ignore", FutureWarning)

d = gap_regression(n_train=2000, seed=0)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
model = pbnn.BNN(net)

# %%
t0 = time.perf_counter()
post = pbnn.fit(
    model,
    d["x_train"],
    d["y_train"],
    method="svi",
    batch_size=64,
    num_steps=200 if QUICK else 3000,
    seed=0,
    distributed=True,
    progress=False,
)
elapsed = time.perf_counter() - t0
rank = int(os.environ.get("RANK", 0))
print(f"rank {rank}: fit in {elapsed:.1f} s, world size {os.environ.get('WORLD_SIZE', 1)}")

# %%
if rank == 0:
    pred = post.predict(d["x_test"])
    print("test NLL", pbnn.metrics.nll(pred, d["y_test"]))
    lo, hi = pred.interval(0.9)
    plt.figure(figsize=(5, 3.5))
    plt.fill_between(d["x_test"][:, 0], lo, hi, alpha=0.3)
    plt.plot(d["x_test"][:, 0], pred.mean)
    plt.scatter(d["x_train"][::10, 0], d["y_train"][::10], s=3, c="k")
    plt.tight_layout()
    plt.savefig(OUT / "distributed.png", dpi=100)
    print(f"wrote {OUT / 'distributed.png'}")

# %% [markdown]
# ## Parallel NUTS chains
#
# With `distributed=True`, NUTS spreads its chains over the ranks: with 2 ranks, rank 0
# runs chains 0-1 and rank 1 chains 2-3. Each chain has its own generator derived from the
# seed and its index, so the draws below are the same under `torchrun` with any number of
# ranks and under plain `python`. (Full-batch NUTS on 2000 points is slow, so this part
# uses 200 of them, a smaller net and short chains, to stay within a minute on 2 CPU cores.)

# %%
torch.manual_seed(0)
small = pbnn.BNN(torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)))
t0 = time.perf_counter()
chains = pbnn.fit(
    small,
    d["x_train"][::10],
    d["y_train"][::10],
    method="nuts",
    num_chains=4,
    warmup=30 if QUICK else 100,
    num_samples=30 if QUICK else 100,
    map_steps=100 if QUICK else 1000,
    max_tree_depth=5 if QUICK else 6,
    seed=0,
    distributed=True,
    progress=False,
    warn=not QUICK,
)
print(f"rank {rank}: NUTS in {time.perf_counter() - t0:.1f} s, draws {tuple(chains.samples['0.weight'].shape)}")
if rank == 0:
    print("first draw of each chain, 0.bias[0]:", chains.samples["0.bias"][:, 0, 0])
    print("test NLL (NUTS)", pbnn.metrics.nll(chains.predict(d["x_test"]), d["y_test"]))
