"""Inference backends. Each is one file; ``BACKENDS`` maps method names to classes.

Example:
    >>> import pbnn
    >>> sorted(pbnn.infer.BACKENDS)[:2]
    ['dropconnect', 'ensemble']
"""

from pbnn.infer.base import BACKENDS, Backend, make_backend, register
from pbnn.infer.dropout import DropConnect, MCDropout
from pbnn.infer.ensemble import DeepEnsemble
from pbnn.infer.fge import FGE
from pbnn.infer.map import MAP
from pbnn.infer.svi import SVI
from pbnn.infer.swag import SWA, SWAG, MultiSWAG

register("svi", SVI)
register("map", MAP)
register("ensemble", DeepEnsemble)
register("swa", SWA)
register("swag", SWAG)
register("multiswag", MultiSWAG)
register("fge", FGE)
register("mc-dropout", MCDropout)
register("dropconnect", DropConnect)

__all__ = [
    "BACKENDS",
    "Backend",
    "make_backend",
    "register",
    "SVI",
    "MAP",
    "DeepEnsemble",
    "SWA",
    "SWAG",
    "MultiSWAG",
    "FGE",
    "MCDropout",
    "DropConnect",
]
