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

from pbnn import approx, arviz_io, calibration, data, distributed, infer, likelihoods, metrics, potential, priors
from pbnn.api import fit
from pbnn.metrics import evaluate
from pbnn.model import BNN
from pbnn.posterior import Posterior
from pbnn.predictive import Prediction

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
]
