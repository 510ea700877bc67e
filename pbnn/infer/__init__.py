"""Inference backends. Each is one file that registers itself (``@register("name")``);
``BACKENDS`` maps method names to classes.

Example:
    >>> import pbnn
    >>> {"map", "svi"} <= set(pbnn.infer.BACKENDS)
    True
"""

from pbnn.infer.base import BACKENDS, Backend, make_backend, register
from pbnn.infer.dropout import DropConnect, MCDropout
from pbnn.infer.ensemble import DeepEnsemble
from pbnn.infer.fge import FGE
from pbnn.infer.laplace import Laplace
from pbnn.infer.map import MAP
from pbnn.infer.mh import MH
from pbnn.infer.nuts import HMC, NUTS
from pbnn.infer.sgmcmc import PSGLD, SGHMC, SGLD, CyclicalSGHMC, CyclicalSGLD
from pbnn.infer.svi import SVI
from pbnn.infer.swag import SWA, SWAG, MultiSWAG

__all__ = [
    "BACKENDS",
    "Backend",
    "make_backend",
    "register",
    "SVI",
    "MAP",
    "Laplace",
    "NUTS",
    "HMC",
    "MH",
    "SGLD",
    "SGHMC",
    "PSGLD",
    "CyclicalSGLD",
    "CyclicalSGHMC",
    "DeepEnsemble",
    "SWA",
    "SWAG",
    "MultiSWAG",
    "FGE",
    "MCDropout",
    "DropConnect",
]
