"""Training data and the input checks shared by every backend: bad data fails early with a
message that says the fix.

Data comes in as tensors (:class:`Data`) or as a re-iterable of ``(x, y)`` batches such as a
``torch.utils.data.DataLoader`` (:class:`LoaderData`: every batch is checked as it is read).
Both answer ``rows(idx)`` (the rows of a minibatch: index tensor or :class:`Batch`, with the
likelihood scale ``N / B``) and ``head()`` (rows to probe the network with).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pbnn.core.model import BNN, eval_mode

__all__ = [
    "Data",
    "Batch",
    "LoaderData",
    "FitWarning",
    "MAX_FULL_BATCH_BYTES",
    "as_tensor",
    "validate",
    "check_inputs",
    "scale_warning",
]

MAX_FULL_BATCH_BYTES = 2**30
"""Largest data (bytes of ``x`` and ``y``) pbnn concatenates from a loader or Dataset into
tensors, for full-batch methods (NUTS, HMC, MH, Laplace's curvature) and a Posterior's
``log_likelihood()`` / ``to_arviz()`` / ``save()``. Larger data raise a ValueError that names
the minibatch methods; assign ``pbnn.core.data.MAX_FULL_BATCH_BYTES`` to change it."""

MINIBATCH_METHODS = "map, svi, sgld, sghmc, psgld, csgld, csghmc, ensemble, swa, swag, multiswag, fge, mc-dropout"


class FitWarning(UserWarning):
    """A fit that ran but is likely useless: data far from standardised, a training loss
    that rose, chains that never moved. A UserWarning, so it shows by default; silence it
    with ``warnings.filterwarnings("ignore", category=pbnn.core.data.FitWarning)``."""


@dataclass(frozen=True)
class Batch:
    """One validated minibatch ``(x, y)`` read from a loader (in place of row indices)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def tensor_split(self, k: int) -> list[Batch]:
        """``k`` consecutive parts (micro-batches), as ``Tensor.tensor_split``."""
        return [Batch(x, y) for x, y in zip(self.x.tensor_split(k), self.y.tensor_split(k))]


@dataclass
class Data:
    """Validated training data: ``x`` ``[N, ...]`` and targets ``y`` in canonical form."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, idx: torch.Tensor | Batch | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(x, y, scale)`` of a minibatch: ``idx`` row indices, a :class:`Batch`, or None
        (all rows, scale 1); the log-likelihood of the rows is scaled by ``scale = N / B``."""
        if idx is None:
            return self.x, self.y, 1.0
        if isinstance(idx, Batch):
            return idx.x, idx.y, len(self) / len(idx)
        return self.x[idx], self.y[idx], len(self) / idx.shape[0]

    def head(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rows`` rows (None: all) as ``(x, y)``."""
        return self.x[:rows], self.y[:rows]

    def full_pass(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The data as ``(x, y)`` parts whose sums make full-batch quantities: here one part."""
        return [(self.x, self.y)]


class LoaderData:
    """Training data behind a re-iterable of ``(x, y)`` batches (a ``DataLoader``).

    Built by :func:`validate`. ``len()`` is the number of rows ``N`` (the loader's sampler, or
    counted on a first pass); :meth:`batches` yields checked :class:`Batch` objects, one pass
    over the loader as it is (its batch size, sampler, workers, ``drop_last``); ``x`` / ``y``
    concatenate all batches once (cached) for full-batch computations, up to
    :data:`MAX_FULL_BATCH_BYTES`.

    Example:
        >>> import torch, pbnn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = pbnn.BNN(torch.nn.Linear(2, 1))
        >>> loader = DataLoader(TensorDataset(torch.randn(10, 2), torch.randn(10)), batch_size=4)
        >>> data = pbnn.data.validate(model, loader)
        >>> len(data), [len(b) for b in data.batches()], tuple(data.x.shape)
        (10, [4, 4, 2], (10, 2))
    """

    def __init__(self, source: Iterable, check: Callable[[object, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.source, self._check, self._full = source, check, None
        sampler = getattr(source, "sampler", None)
        self.sharded = getattr(sampler, "num_replicas", 1) > 1  # a DistributedSampler's shard of the data
        with torch.random.fork_rng(devices=[]):  # reading ahead never moves the fit's random stream
            self.first = Batch(*check(_first(source), 0))
            n = _declared_rows(source)
            if n is None:  # no sampler length (an IterableDataset, a list of batches): count once
                n = sum(len(b) for b in self.batches())
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batches(self) -> Iterator[Batch]:
        """One pass over the loader: checked batches (errors name the batch's position)."""
        for i, b in enumerate(self.source):
            yield Batch(*self._check(b, i))

    def rows(self, idx: Batch | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """As :meth:`Data.rows`; ``idx`` is a :class:`Batch` (row indices have no meaning here)."""
        if idx is None:
            return self.x, self.y, 1.0
        if not isinstance(idx, Batch):
            raise TypeError(
                "data from a loader has no row indices: minibatches come from the loader itself "
                "(a pbnn.data.Batch); this computation needs tensors x, y"
            )
        return idx.x, idx.y, self.n / len(idx)

    def head(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch's first ``rows`` rows (None: the whole first batch)."""
        return self.first.x[:rows], self.first.y[:rows]

    def full_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass of ``(x, y)`` batches to sum full-batch quantities over (a GGN, a
        log-likelihood) without concatenating them; the reads leave torch's RNG as it was.
        Raises a ValueError after the pass unless it read exactly ``N`` rows (``drop_last``, or
        a sampler that skips or repeats rows, would make the sum wrong)."""
        if self.sharded:
            raise ValueError(_SHARD_MESSAGE)
        batches, state, seen = self.batches(), None, 0
        while True:
            with torch.random.fork_rng(devices=[]):
                if state is not None:
                    torch.set_rng_state(state)
                b = next(batches, None)
                state = torch.get_rng_state()
            if b is None:
                break
            seen += len(b)
            yield b.x, b.y
        if seen != self.n:
            raise ValueError(
                f"one pass over the loader read {seen} rows, not its {self.n}: a full-data sum (Laplace's "
                "curvature) needs every row once; build the loader with drop_last=False and a sampler "
                "without replacement (e.g. shuffle=True or False)"
            )

    @property
    def x(self) -> torch.Tensor:
        return self.tensors()[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors()[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All batches concatenated (once, cached), within :data:`MAX_FULL_BATCH_BYTES`."""
        if self._full is None:
            if self.sharded:
                raise ValueError(_SHARD_MESSAGE)
            xs, ys, size = [], [], 0
            with torch.random.fork_rng(devices=[]):
                for b in self.batches():
                    size += _nbytes(b.x) + _nbytes(b.y)
                    if size > MAX_FULL_BATCH_BYTES:
                        raise ValueError(
                            f"the data from the loader exceed pbnn.core.data.MAX_FULL_BATCH_BYTES "
                            f"({MAX_FULL_BATCH_BYTES} bytes), the most pbnn concatenates for a full-batch "
                            "computation (NUTS / HMC / MH, Laplace's curvature, Posterior.log_likelihood / "
                            f"to_arviz / save); use a minibatch method ({MINIBATCH_METHODS}), or raise "
                            "the limit if the data fit in memory"
                        )
                    xs.append(b.x)
                    ys.append(b.y)
            self._full = (torch.cat(xs), torch.cat(ys))
        return self._full


_SHARD_MESSAGE = (
    "this computation needs all the data, but the loader's DistributedSampler gives this rank only its "
    "shard: full-batch methods (nuts, hmc, mh, laplace) and methods that spread chains or members over "
    "the ranks need a loader with a plain sampler on every rank"
)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _first(source: Iterable):
    for b in source:
        return b
    raise ValueError("the data yielded no batches; pass a loader over at least one example")


def _declared_rows(source) -> int | None:
    """Rows per epoch as the loader declares them: the dataset's size behind a DistributedSampler
    (every rank's shard together), else the sampler's length; None when there is none."""
    from torch.utils.data import BatchSampler, DataLoader

    if not isinstance(source, DataLoader):
        return None
    sampler = source.sampler
    if getattr(sampler, "num_replicas", 1) > 1:  # DistributedSampler
        return len(sampler.dataset)
    if source.batch_sampler is not None and type(source.batch_sampler) is not BatchSampler:
        return None  # a custom batch sampler may skip or repeat rows: count them
    try:
        return len(sampler)
    except TypeError:  # an IterableDataset's sampler has no length
        return None


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


def validate(model, x, y=None) -> Data | LoaderData:
    """Check ``x`` and ``y`` for a model; for a :class:`pbnn.BNN` also check the targets
    against the likelihood and the network's output size.

    With ``y`` None, ``x`` is the data as a whole: a ``torch.utils.data.DataLoader`` or any
    re-iterable of ``(x, y)`` batches (-> :class:`LoaderData`, every batch checked as it is
    read: the first one here, against the network), or a map-style ``Dataset`` whose items
    are ``(x_i, y_i)`` (-> :class:`Data`, stacked into tensors). A hand-written Pyro model
    gets its loader concatenated into tensors (within :data:`MAX_FULL_BATCH_BYTES`).
    """
    if y is None:
        if isinstance(x, (torch.Tensor, np.ndarray)) or x is None:
            raise ValueError(
                "y is missing: pass fit(model, x, y), or fit(model, loader) with a loader of (x, y) batches"
            )
        return _validate_source(model, x)
    if _is_data_source(x):
        raise ValueError(
            f"x is a {type(x).__name__} and y is given too: pass the loader or Dataset alone, fit(model, data), "
            "with (x, y) batches or items"
        )
    return _validate_tensors(model, x, y)


def _is_data_source(x) -> bool:
    from torch.utils.data import DataLoader, Dataset

    return isinstance(x, (DataLoader, Dataset))


def _validate_source(model, source) -> Data | LoaderData:
    from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

    if isinstance(source, TensorDataset):
        if len(source.tensors) != 2:
            raise ValueError(f"a TensorDataset must hold two tensors (x, y), got {len(source.tensors)}")
        return _validate_tensors(model, *source.tensors)
    if isinstance(source, IterableDataset):
        raise TypeError(
            f"{type(source).__name__} is an IterableDataset (it yields single examples): wrap it as "
            "DataLoader(dataset, batch_size=...) so that pbnn reads (x, y) batches"
        )
    if isinstance(source, Dataset):  # map-style: items (x_i, y_i), stacked into tensors
        if not hasattr(source, "__len__") or len(source) == 0:
            raise ValueError(f"the Dataset {type(source).__name__} has no length or no items; pass a DataLoader")
        first = _pair(source[0], "item 0 of the Dataset", "a Dataset whose items are (x_i, y_i)")
        size = len(source) * sum(_nbytes(torch.as_tensor(a)) for a in first)
        if size > MAX_FULL_BATCH_BYTES:
            raise ValueError(
                f"the Dataset holds about {size} bytes, more than pbnn.core.data.MAX_FULL_BATCH_BYTES "
                f"({MAX_FULL_BATCH_BYTES}) that pbnn stacks into tensors: pass DataLoader(dataset, "
                "batch_size=..., shuffle=True) instead"
            )
        x, y = _pair(default_collate([source[i] for i in range(len(source))]), "the Dataset", "")
        return _validate_tensors(model, x, y)
    try:
        one_shot = iter(source) is source
    except TypeError:
        raise TypeError(
            f"data of type {type(source).__name__} is neither tensors nor a DataLoader / Dataset / "
            "re-iterable of (x, y) batches; pass fit(model, x, y) or fit(model, loader)"
        ) from None
    if one_shot:
        raise TypeError(
            f"data is a one-shot {type(source).__name__} (a generator or iterator): pbnn passes over the "
            "data many times and it can be read only once; pass a DataLoader, a list of (x, y) batches, "
            "or an object whose __iter__ starts a fresh pass"
        )
    state: dict = {}
    like = next(model.net.parameters()) if isinstance(model, BNN) else None  # the data follows a BNN's weights

    def check(b, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"batch {i} of the data"
        bx, by = _pair(b, where, "a DataLoader over a TensorDataset(x, y) or a Dataset whose items are (x_i, y_i)")
        if not state:  # the first batch: the full checks, against the network
            d = _validate_tensors(model, bx, by, where)
            state.update(row=tuple(d.x.shape[1:]), out=model.output_dim(d.x) if isinstance(model, BNN) else None)
            return d.x, d.y
        bx, by = as_tensor(bx, f"x of {where}", float_only=True, like=like), as_tensor(by, f"y of {where}", like=like)
        if bx.shape[0] != by.shape[0]:
            raise ValueError(f"{where}: x and y have different numbers of rows ({bx.shape[0]} and {by.shape[0]})")
        if tuple(bx.shape[1:]) != state["row"]:
            raise ValueError(
                f"{where}: x has rows of shape {tuple(bx.shape[1:])}, the first batch had {state['row']}; "
                "every batch must hold the same kind of rows"
            )
        if state["out"] is not None:
            try:
                by = model.likelihood.validate_targets(by, state["out"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        return bx, by

    data = LoaderData(source, check)
    if not isinstance(model, BNN):  # a Pyro model is traced on tensors
        return Data(*data.tensors())
    return data


def _pair(b, where: str, fix: str) -> tuple:
    if isinstance(b, (tuple, list)) and len(b) == 2:
        return b[0], b[1]
    what = f"{type(b).__name__} of length {len(b)}" if isinstance(b, (tuple, list)) else type(b).__name__
    raise ValueError(f"{where} is a {what}, not an (x, y) pair" + (f"; pass {fix}" if fix else ""))


def _validate_tensors(model, x, y, where: str = "") -> Data:
    if where:  # name the batch in every message
        try:
            return _validate_tensors(model, x, y)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
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
    try:  # eval mode, as BNN.output_dim: no BatchNorm statistics updated, no dropout
        with eval_mode(net), torch.no_grad():
            out = net(probe)
    except RuntimeError as e:
        if not hint:
            return  # other shape errors are reported by BNN.output_dim with the network's message
        raise ValueError(f"the network cannot take x of shape {tuple(x.shape)}{hint} ({e})") from e
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
    found = []
    x, y = data.head()  # a loader's first batch
    x_off = _off_scale(x)
    if x_off:
        found.append(f"inputs x ({x_off})")
    classification = isinstance(model, BNN) and model.likelihood.is_classification
    y_off = None if classification else _off_scale(y)
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
