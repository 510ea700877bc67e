"""Input checks shared by every backend: bad data fails early with a message that says the fix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Data", "as_tensor", "validate"]


@dataclass
class Data:
    """Validated training data: ``x`` ``[N, ...]`` and targets ``y`` in canonical form."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def as_tensor(a, name: str, *, float_only: bool = False) -> torch.Tensor:
    """Convert arrays/lists to tensors (floats to the default dtype) and reject NaN/inf."""
    if a is None:
        raise ValueError(f"{name} is None; pass an array or tensor")
    if isinstance(a, np.ndarray) or not isinstance(a, torch.Tensor):
        a = torch.as_tensor(np.asarray(a))
    if a.is_floating_point() or float_only:
        a = a.to(torch.get_default_dtype())
    if a.dim() == 0:
        raise ValueError(f"{name} is a scalar; pass one row per example (shape [N, ...])")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows); pass at least one example")
    if a.is_floating_point():
        bad = ~torch.isfinite(a)
        if bad.any():
            rows = torch.nonzero(bad.reshape(a.shape[0], -1).any(1)).flatten()
            raise ValueError(
                f"{name} contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                "drop or impute those rows before fitting"
            )
    return a


def validate(model, x, y) -> Data:
    """Check ``x`` and ``y`` for a model; for a :class:`pbnn.BNN` also check the targets
    against the likelihood and the network's output size."""
    x = as_tensor(x, "x", float_only=True)
    y = as_tensor(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different numbers of rows: len(x) = {x.shape[0]}, len(y) = {y.shape[0]}")
    from pbnn.core.model import BNN  # local: data checks sit below the model in the import graph

    if isinstance(model, BNN):
        try:
            out_dim = model.output_dim(x)
        except RuntimeError as e:
            raise ValueError(f"the network cannot take x of shape {tuple(x.shape)}: {e}") from e
        y = model.likelihood.validate_targets(y, out_dim)
    return Data(x, y)
