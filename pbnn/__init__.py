"""pbnn: Bayesian neural networks on Pyro, every inference family behind one API.

Example:
    >>> import torch, pbnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> model = pbnn.BNN(net, prior=pbnn.priors.Normal(0.0, 1.0),
    ...                  likelihood=pbnn.likelihoods.Gaussian(scale="learned"))
    >>> x = torch.linspace(-2, 2, 64)[:, None]; y = torch.sin(2 * x[:, 0])
    >>> post = pbnn.fit(model, x, y, method="svi", num_steps=300, progress=False, seed=0)
    >>> pred = post.predict(x)
    >>> pred.mean.shape, pred.interval(0.9)[0].shape
    (torch.Size([64]), torch.Size([64]))
"""

import sys as _sys

from pbnn import infer
from pbnn.api import fit
from pbnn.apps import bench
from pbnn.core import data, datasets, likelihoods, potential, priors
from pbnn.core.model import BNN
from pbnn.engine import distributed
from pbnn.evaluation import calibration, metrics, plots
from pbnn.evaluation.metrics import evaluate
from pbnn.posterior import Posterior, Prediction, approx, arviz_io

# The layers live in sub-packages (core, kernels, engine, posterior, infer, evaluation, apps);
# the modules users import by their short names stay importable as ``pbnn.<name>``.
for _module in (
    approx,
    arviz_io,
    bench,
    calibration,
    data,
    datasets,
    distributed,
    likelihoods,
    metrics,
    plots,
    potential,
    priors,
):
    _sys.modules[f"pbnn.{_module.__name__.rsplit('.', 1)[-1]}"] = _module
del _module

__version__ = "0.1.0"

__all__ = [
    "BNN",
    "Posterior",
    "Prediction",
    "fit",
    "evaluate",
    "infer",
    "priors",
    "likelihoods",
    "approx",
    "arviz_io",
    "calibration",
    "data",
    "distributed",
    "metrics",
    "potential",
    "plots",
    "datasets",
    "bench",
]
