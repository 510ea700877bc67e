# %% [markdown]
# # A CNN with BatchNorm, fed by a DataLoader
#
# scikit-learn's handwritten digits as 1x8x8 images, a small CNN with BatchNorm, and a
# `torch.utils.data.DataLoader` passed straight to `pbnn.fit(model, loader)`. Three
# backends (MAP, SWAG, last-layer KFAC Laplace) are evaluated with
# `pbnn.evaluate(post, test_loader)` (streamed over the test batches) and compared on
# accuracy, NLL and ECE; reliability diagrams go to `tutorials/output/`.
# `PBNN_QUICK=1` makes it a fast smoke run.

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pbnn.plots
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pbnn

QUICK = os.environ.get("PBNN_QUICK") == "1"
OUT = Path(os.environ.get("PBNN_TUTORIAL_OUT", "tutorials/output"))
OUT.mkdir(parents=True, exist_ok=True)
warnings.simplefilter("ignore", FutureWarning)

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1300], perm[1300:]
train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)
test_loader = DataLoader(TensorDataset(x[test], y[test]), batch_size=256)

# %% [markdown]
# ## The network
#
# Two 3x3 convolutions with BatchNorm, global average pooling and a linear head. pbnn
# trains the BatchNorm layers in train mode (batch statistics) and predicts in eval mode;
# SWAG recomputes each draw's statistics on the training data, MAP and the Laplace GLM
# predictive use the running statistics from training (see `docs/model.md`, "BatchNorm").

# %%
torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1),
    nn.BatchNorm2d(16),
    nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1, stride=2),
    nn.BatchNorm2d(32),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(32, 10),
)
model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())

# %% [markdown]
# ## Fit three backends on the loader, evaluate on the test loader
#
# Each optimiser step takes the loader's next batch (passes cycle); the log-likelihood of a
# batch is scaled by `N / B`. Laplace fits its MAP on the batches, then sums the KFAC
# factors of the last layer over one pass of the loader.

# %%
steps = 40 if QUICK else 600
fits = {
    "map": dict(num_steps=steps),
    "swag": dict(map_steps=steps, num_steps=steps + (30 if QUICK else 300), num_samples=5 if QUICK else 30),
    "laplace": dict(map_steps=steps, hessian="kfac", subset="last_layer", num_samples=20 if QUICK else 200),
}
rows = {}
for method, opts in fits.items():
    t0 = time.perf_counter()
    post = pbnn.fit(model, train_loader, method=method, seed=0, progress=False, **opts)
    print(f"{method}: fitted in {time.perf_counter() - t0:.1f} s")
    rows[method] = pbnn.evaluate(post, test_loader)
    pred = post.predict(x[test])
    pbnn.plots.reliability_diagram(
        pred, y[test], title=f"{method}: ECE {rows[method]['ece']:.3f}", path=OUT / f"cnn_reliability_{method}.png"
    )

print(f"{'method':>8} {'accuracy':>9} {'NLL':>7} {'ECE':>7}")
for method, m in rows.items():
    print(f"{method:>8} {m['accuracy']:9.3f} {m['nll']:7.3f} {m['ece']:7.3f}")
print(f"wrote reliability diagrams to {OUT}")
