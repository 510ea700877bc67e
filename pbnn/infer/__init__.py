"""Inference backends. Each is one file; ``BACKENDS`` maps method names to classes.

Example:
    >>> import pbnn
    >>> sorted(pbnn.infer.BACKENDS)[:2]
    ['map', 'svi']
"""

from pbnn.infer.base import BACKENDS, Backend, make_backend, register
from pbnn.infer.map import MAP
from pbnn.infer.svi import SVI

register("svi", SVI)
register("map", MAP)

__all__ = ["BACKENDS", "Backend", "make_backend", "register", "SVI", "MAP"]
