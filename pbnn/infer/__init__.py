"""Inference backends. Each is one file; ``BACKENDS`` maps method names to classes.

Example:
    >>> import pbnn
    >>> {"map", "svi"} <= set(pbnn.infer.BACKENDS)
    True
"""

from pbnn.infer.base import BACKENDS, Backend, make_backend, register
from pbnn.infer.laplace import Laplace
from pbnn.infer.map import MAP
from pbnn.infer.svi import SVI

register("svi", SVI)
register("map", MAP)
register("laplace", Laplace)

__all__ = ["BACKENDS", "Backend", "make_backend", "register", "SVI", "MAP", "Laplace"]
