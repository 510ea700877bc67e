"""Input checks shared by every backend: bad data fails early with a message that says the fix."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Data", "FitWarning", "as_tensor", "validate", "check_inputs", "scale_warning"]


class FitWarning(UserWarning):
    """A fit that ran but is likely useless: data far from standardised, a training loss
    that rose, chains that never moved. A UserWarning, so it shows by default; silence it
    with ``warnings.filterwarnings("ignore", category=pbnn.core.data.FitWarning)``."""


@dataclass
class Data:
    """Validated training data: ``x`` ``[N, ...]`` and targets ``y`` in canonical form."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def as_tensor(a, name: str, *, float_only: bool = False, like: torch.Tensor | None = None) -> torch.Tensor:
    """Convert arrays/lists to tensors and reject NaN/inf.

    Floats take the dtype and device of ``like`` when given (a BNN's parameters: the data
    follows the model, so ``net.double()`` or ``net.cuda()`` is all a user does); otherwise
    tensors keep their dtype and device, and arrays / lists get the default dtype.
    """
    if a is None:
        raise ValueError(f"{name} is None; pass an array or tensor")
    if isinstance(a, np.ndarray) or not isinstance(a, torch.Tensor):
        a = torch.as_tensor(np.asarray(a))
        if a.is_floating_point():
            a = a.to(torch.get_default_dtype())
    if a.is_floating_point() or float_only:
        a = a.to(like.dtype if like is not None else a.dtype if a.is_floating_point() else torch.get_default_dtype())
    if like is not None:
        a = a.to(like.device)
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
    from pbnn.core.model import BNN  # local: data checks sit below the model in the import graph

    like = next(model.net.parameters()) if isinstance(model, BNN) else None  # the data follows a BNN's weights
    x = as_tensor(x, "x", float_only=True, like=like)
    y = as_tensor(y, "y", like=like)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different numbers of rows: len(x) = {x.shape[0]}, len(y) = {y.shape[0]}")
    if isinstance(model, BNN):
        _check_batch_dim(model.net, x)
        try:
            out_dim = model.output_dim(x)
        except RuntimeError as e:
            raise ValueError(f"the network cannot take x of shape {tuple(x.shape)}: {e}") from e
        y = model.likelihood.validate_targets(y, out_dim)
        y = y.to(like.dtype) if y.is_floating_point() else y  # integer regression targets too
    return Data(x, y)


def _check_batch_dim(net: torch.nn.Module, x: torch.Tensor) -> None:
    """Run the network on a two-row probe of ``x`` and require two output rows.

    A 1-D ``x`` ``[N]`` fed to a net whose first layer wants features (``Linear(1, h)``)
    maps one row to one output but fails (or, for ``N = 1``, silently treats the batch as
    features) on more rows; catching it here gives the fix instead of a raw matmul error.
    """
    probe = x[:2] if x.shape[0] >= 2 else torch.cat([x[:1], x[:1]])
    hint = (
        f"; x is 1-D (shape {tuple(x.shape)}): for one input feature pass x[:, None] (shape [{x.shape[0]}, 1])"
        if x.dim() == 1
        else ""
    )
    was_training = net.training
    net.eval()  # as BNN.output_dim: no BatchNorm statistics updated, no dropout
    try:
        with torch.no_grad():
            out = net(probe)
    except RuntimeError as e:
        if not hint:
            return  # other shape errors are reported by BNN.output_dim with the network's message
        raise ValueError(f"the network cannot take x of shape {tuple(x.shape)}{hint} ({e})") from e
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the network maps 2 rows of x (shape {tuple(probe.shape)}) to output {shape}, not one output row "
            f"per input row{hint or '; its first dimension must be the batch'}"
        )


def check_inputs(x, train_x: torch.Tensor | None, what: str = "x") -> torch.Tensor:
    """``x`` as a tensor whose per-row shape matches the training inputs ``train_x``.

    Raises ValueError naming both shapes (and ``x[:, None]`` for a 1-D ``x`` where the
    training inputs had one feature column) instead of a raw matmul / bmm error later.
    """
    x = as_tensor(x, what, float_only=True, like=train_x)
    if train_x is None or tuple(x.shape[1:]) == tuple(train_x.shape[1:]):
        return x
    expected = "[M" + "".join(f", {d}" for d in train_x.shape[1:]) + "]"
    fix = f"pass {what} of shape {expected}"
    if x.dim() == 1 and tuple(train_x.shape[1:]) == (1,):
        fix = f"pass {what}[:, None] (shape [{x.shape[0]}, 1])"
    elif x.dim() == train_x.dim() == 2:
        fix = f"pass the same {train_x.shape[1]} feature column(s), in the same order, as at fit time"
    raise ValueError(
        f"{what} has shape {tuple(x.shape)} but the model was fitted on inputs of shape {tuple(train_x.shape)} "
        f"(rows of shape {tuple(train_x.shape[1:])}); {fix}"
    )


# Far from standardised: a mean beyond 10 or a standard deviation off 1 by more than 10x.
_SCALE_LIMIT = 10.0


def _off_scale(a: torch.Tensor) -> str | None:
    """Describe how far the columns of ``a`` (``[N]``, ``[N, D]``; over all entries for more
    dims) are from mean 0 / std 1, or None when they are close enough."""
    if not a.is_floating_point() or a.shape[0] < 2:
        return None
    a = a.detach().double()
    cols = a.reshape(a.shape[0], -1) if a.dim() <= 2 else a.reshape(1, -1).T
    mean, std = cols.mean(0), cols.std(0)
    worst_mean = float(mean.abs().max())
    live = std[std > 0]  # constant columns (an intercept, padding) are not a scale problem
    big = float(live.max()) if len(live) else 0.0
    small = float(live.min()) if len(live) else 1.0
    parts = []
    if worst_mean > _SCALE_LIMIT:
        parts.append(f"|mean| up to {worst_mean:.3g}")
    if big > _SCALE_LIMIT:
        parts.append(f"std up to {big:.3g}")
    if small < 1 / _SCALE_LIMIT:
        parts.append(f"std down to {small:.3g}")
    return ", ".join(parts) or None


def scale_warning(model, data: Data) -> str | None:
    """Warn (:class:`FitWarning`) when inputs or real-valued targets are far from standardised.

    Priors and initialisations assume inputs and targets of order one: a mean beyond 10
    or a standard deviation above 10 or below 0.1 (per column; constant columns are
    ignored) usually gives a fit stuck near the prior (predictions within +-1, intervals
    that cover nothing). Class labels are not checked. Returns the message, or None.
    """
    from pbnn.core.model import BNN  # local: data checks sit below the model in the import graph

    found = []
    x_off = _off_scale(data.x)
    if x_off:
        found.append(f"inputs x ({x_off})")
    classification = isinstance(model, BNN) and model.likelihood.is_classification
    y_off = None if classification else _off_scale(data.y)
    if y_off:
        found.append(f"targets y ({y_off})")
    if not found:
        return None
    msg = (
        f"the {' and '.join(found)} are far from standardised (mean 0, std 1); the priors and "
        "initialisation assume order-one data, so the fit may stay near the prior. Standardise: "
        "x = (x - x.mean(0)) / x.std(0), y = (y - y.mean(0)) / y.std(0), and map predictions back "
        "with mean * y_std + y_mean, stddev * y_std"
    )
    warnings.warn(msg, FitWarning, stacklevel=3)
    return msg
