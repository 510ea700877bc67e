"""What every backend shares: the ``Backend`` interface and the method registry.

A backend is a small object built from its options; ``backend.fit(model, data)``
returns a :class:`pbnn.Posterior`. A new backend is one file in ``pbnn/infer/`` plus one
``register`` line in ``pbnn/infer/__init__.py``.
"""

from __future__ import annotations

import inspect

import torch

from pbnn.data import Data

__all__ = ["Backend", "register", "make_backend", "BACKENDS", "accepts_subsample"]

BACKENDS: dict[str, type[Backend]] = {}


class Backend:
    """Interface of an inference backend."""

    name: str = ""

    def fit(self, model, data: Data):  # -> pbnn.Posterior
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def register(name: str, cls: type[Backend]) -> None:
    BACKENDS[name] = cls


def make_backend(method, **options) -> Backend:
    """Turn ``method`` (a registered name or a Backend instance) plus options into a backend."""
    if isinstance(method, Backend):
        if options:
            raise ValueError(
                f"options {sorted(options)} were given together with a backend object; "
                f"set them on the object instead, e.g. pbnn.infer.{type(method).__name__}(...)"
            )
        return method
    if isinstance(method, type) and issubclass(method, Backend):
        return method(**options)
    if not isinstance(method, str) or method.lower() not in BACKENDS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[method.lower()]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters]
        raise ValueError(f"bad option for method {method!r}: {e}; its options are {params}") from None
    return cls(**options)


def accepts_subsample(model) -> bool:
    """Whether a Pyro model takes the ``subsample=`` keyword pbnn uses for minibatches."""
    try:
        return "subsample" in inspect.signature(model).parameters
    except (TypeError, ValueError):
        return False


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not value > 0 or not torch.isfinite(torch.tensor(float(value))):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
