"""Inference backends. Each is one file; ``BACKENDS`` maps method names to classes.

Example:
    >>> import pbnn
    >>> "map" in pbnn.infer.BACKENDS
    True
"""

from pbnn.infer.base import BACKENDS, Backend, make_backend, register
from pbnn.infer.map import MAP
from pbnn.infer.mh import MH
from pbnn.infer.nuts import HMC, NUTS
from pbnn.infer.svi import SVI

register("svi", SVI)
register("map", MAP)
register("nuts", NUTS)
register("hmc", HMC)
register("mh", MH)

__all__ = ["BACKENDS", "Backend", "make_backend", "register", "SVI", "MAP", "NUTS", "HMC", "MH"]
