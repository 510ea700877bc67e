"""Declarative options: a backend lists its options once, as fields of a frozen dataclass
with a check each, and gets validation, ``repr``, equality and the list of its option
names (for ``make_backend``'s error and the API docs) from the declaration.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Steps(Options):
    ...     num_steps: int = option(100, positive_int)
    >>> Steps(num_steps=5)
    Steps(num_steps=5)
    >>> Steps(num_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: num_steps must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Options",
    "option",
    "option_names",
    "positive_int",
    "nonneg_int",
    "positive",
    "nonneg",
    "probability",
    "one_of",
    "optional",
    "boolean",
    "random_seed",
    "check_positive_int",
]

Check = Callable[[str, Any], Any]


def option(default: Any, check: Check | None = None) -> Any:
    """A declared option: its default and the check that validates (and normalises) a value."""
    return dataclasses.field(default=default, metadata={"check": check})


def option_names(cls) -> list[str]:
    """The option names of an :class:`Options` class, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


@dataclass(frozen=True, kw_only=True)
class Options:
    """Root of every option declaration: runs each field's check, then :meth:`validate`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several options (override, and call ``super().validate()``)."""

    def replace(self, **changes):
        """A copy with some options changed (and checked again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def nonneg_int(name: str, value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def positive(name: str, value) -> float:
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def nonneg(name: str, value) -> float:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """A number strictly between 0 and 1."""
    if not _is_number(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def random_seed(name: str, value) -> int | None:
    """None, or an integer seed (numpy integers accepted)."""
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer or None, got {value!r}")
    return int(value)


def one_of(*choices) -> Check:
    """A check that accepts exactly ``choices``."""

    def check(name: str, value):
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


def optional(check: Check) -> Check:
    """``check``, or None."""
    return lambda name, value: None if value is None else check(name, value)


# The name pbnn.apps.bench calls (from before the options were declarative).
check_positive_int = positive_int
