"""What every backend shares: the ``Backend`` interface, shared option groups and the registry.

A backend is a frozen dataclass of its options plus ``run(potential) -> Posterior``
(``docs/writing_a_backend.md``).

Example:
    >>> import torch, pbnn
    >>> from dataclasses import dataclass
    >>> from pbnn.infer.base import Backend, RunOptions, register
    >>> @register("prior-draws")
    ... @dataclass(frozen=True, kw_only=True)
    ... class PriorDraws(Backend, RunOptions):
    ...     '''Draws from the initialisation jittered by N(0, scale^2): a toy "posterior".'''
    ...     num_samples: int = pbnn.core.options.option(10, pbnn.core.options.positive_int)
    ...     def run(self, potential):
    ...         z = potential.initial_z() + 0.1 * torch.randn(self.num_samples, potential.dim)
    ...         return self.posterior(potential, potential.layout.constrain(z[None]))
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1))
    >>> post = pbnn.fit(model, torch.randn(8, 1), torch.randn(8), method="prior-draws", seed=0)
    >>> post.method, post.samples["weight"].shape
    ('prior-draws', torch.Size([1, 10, 1, 1]))
    >>> _ = BACKENDS.pop("prior-draws")
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pyro
import torch

from pbnn.core.data import Data, FitWarning, scale_warning, validate
from pbnn.core.options import (
    Options,
    check_positive_int,
    nonneg,
    nonneg_int,
    option,
    optional,
    positive,
    positive_int,
    random_seed,
)
from pbnn.core.potential import Potential, accepts_subsample
from pbnn.engine import chains, distributed
from pbnn.engine.distributed import broadcast_seed
from pbnn.engine.optim import resolve_batch_size, seeded
from pbnn.posterior.diagnostics import convergence_warning
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import has_batchnorm, predict_bn_refresh

__all__ = [
    "Backend",
    "register",
    "make_backend",
    "BACKENDS",
    "RunOptions",
    "OptimOptions",
    "ChainOptions",
    "accepts_subsample",
    "check_positive_int",
    "loss_warning",
    "stuck_chain_warning",
]

BACKENDS: dict[str, type[Backend]] = {}


class Backend:
    """Interface of an inference backend: implement :meth:`run`.

    Class attributes:
        name: the method name (set by :func:`register`).
        model_kinds: the model kinds it serves, ``"bnn"`` (a :class:`pbnn.BNN`) and / or
            ``"pyro"`` (a hand-written Pyro model).
        renamed: former option names -> current ones (accepted with a DeprecationWarning).
        full_batch: True for methods that need the exact log joint of all data (NUTS, HMC,
            MH): ``pbnn.fit`` concatenates a loader into tensors for them.
    """

    name: ClassVar[str] = ""
    model_kinds: ClassVar[tuple[str, ...]] = ("bnn", "pyro")
    renamed: ClassVar[dict[str, str]] = {}
    full_batch: ClassVar[bool] = False  # needs all data in memory: a loader is concatenated into tensors

    def fit(self, model, data: Data | tuple | None = None) -> Posterior:
        """Fit ``model`` (a :class:`pbnn.potential.Potential`, or a model plus ``data``): check its
        kind, seed torch's RNG (broadcast under ``torch.distributed``) without disturbing the
        caller's, :meth:`run` in a private Pyro parameter scope, record the wall time."""
        if isinstance(model, Potential):
            potential = model
        else:
            if not isinstance(data, Data):
                data = validate(model, *data)
            potential = Potential(model, data)
        potential.require(self.name, self.model_kinds)
        scale_warning(potential.model, potential.data)
        start = time.perf_counter()
        with seeded(broadcast_seed(getattr(self, "seed", None))), pyro.get_param_store().scope():
            post = self.run(potential)
        post.info.setdefault("wall_time", time.perf_counter() - start)
        loss_warning(post.info.get("losses"), self.name)
        baseline_warning(post, potential, self.name)
        return post

    def run(self, potential: Potential) -> Posterior:
        """The algorithm: from the model's potential to a Posterior (RNG already seeded)."""
        raise NotImplementedError

    def posterior(self, potential: Potential, samples: dict[str, torch.Tensor], **kwargs) -> Posterior:
        """A Posterior of ``samples`` (``{site: [chain, draw, ...]}``) for this backend's fit."""
        kwargs.setdefault("fixed", {})
        return Posterior(potential.model, samples, data=potential.data, method=self.name, **kwargs)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def loss_warning(losses, method: str) -> str | None:
    """Warn (:class:`pbnn.core.data.FitWarning`, a UserWarning) when the training loss rose.

    Compares the medians of the first and last tenth of the recorded losses (at least 20
    steps; a per-member table ``[steps, members]`` is averaged over members) with a margin
    of two robust standard errors (from the median absolute deviation), so neither the
    noise of a stochastic ELBO nor one early spike triggers it or hides a rise. A loss
    that rose means the fit is worse than its initialisation: almost always a learning
    rate that is too high. Returns the message, or None.
    """
    if losses is None:
        return None
    try:
        t = torch.as_tensor(losses, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return None  # ragged or non-numeric: nothing to compare
    if t.dim() == 2:
        t = t.mean(1)
    if t.dim() != 1 or len(t) < 20 or not torch.isfinite(t).all():
        return None
    k = max(2, len(t) // 10)
    first, last = t[:k].median(), t[-k:].median()

    def spread(w: torch.Tensor) -> torch.Tensor:
        return 1.4826 * (w - w.median()).abs().median()

    margin = 2 * (spread(t[:k]) + spread(t[-k:])) / k**0.5
    if float(last) <= float(first + margin):
        return None
    msg = (
        f"{method}: the training loss ended above where it started (median of the first {k} steps "
        f"{float(first):.4g}, of the last {k} {float(last):.4g}): this fit is worse than its "
        "initialisation. Lower the learning rate (lr) by 10x, and standardise x and y"
    )
    warnings.warn(msg, FitWarning, stacklevel=3)
    return msg


def baseline_warning(post: Posterior, potential: Potential, method: str, rows: int = 256) -> str | None:
    """Warn (:class:`pbnn.core.data.FitWarning`) when a BNN's predictive mean fits its training
    targets worse than their mean does (mean squared error above the targets' variance).

    A fit cannot be useful then, whatever its uncertainty: MAP with ``lr=10`` on standardised
    data ends 16x worse than the mean, while even 30 SVI steps from the network's
    initialisation stay below it. Classification labels (integers) are skipped. Checked on
    the first ``rows`` training points with at most 16 draws. Returns the message, or None.
    """
    x, y = potential.data.head(rows)  # a loader's first batch
    if potential.kind != "bnn" or not y.is_floating_point():
        return None
    mean = post.predict(x, num_samples=min(16, post.num_chains * post.num_draws)).mean
    if mean.shape != y.shape:
        return None
    mse, var = float(((mean - y) ** 2).mean()), float(((y - y.mean(0)) ** 2).mean())
    if not var > 0 or mse <= var:
        return None
    msg = (
        f"{method}: the fit predicts its training targets worse than their mean does (mean squared "
        f"error {mse:.4g} against their variance {var:.4g}): lower the learning rate (lr) by 10x, "
        "train longer, and standardise x and y"
    )
    warnings.warn(msg, FitWarning, stacklevel=3)
    return msg


def stuck_chain_warning(draws: torch.Tensor, method: str, min_moved: float = 0.01) -> str | None:
    """Warn (:class:`pbnn.core.data.FitWarning`) when a chain's draws ``[C, S, D]`` never moved.

    The fraction of consecutive kept draws that differ estimates the acceptance rate
    (thinned: of at least one acceptance in between); below ``min_moved`` the chain is
    stuck at its start (a step size or proposal scale far too large) and its "posterior"
    is one point repeated. Returns the message, or None.
    """
    if draws.dim() < 2 or draws.shape[1] < 2:
        return None
    moved = (draws[:, 1:] != draws[:, :-1]).reshape(draws.shape[0], draws.shape[1] - 1, -1).any(-1)
    rate = moved.double().mean(1)
    stuck = (rate < min_moved).nonzero().flatten().tolist()
    if not stuck:
        return None
    msg = (
        f"{method}: {len(stuck)} of {draws.shape[0]} chain(s) never moved (chains {stuck[:5]}: "
        f"{float(rate[stuck].max()):.1%} of {draws.shape[1] - 1} transitions changed the draw, "
        "acceptance ~0): their draws are one point repeated, not a posterior. Lower the step size "
        "/ proposal scale (or let warmup adapt it) and check the data are standardised"
    )
    warnings.warn(msg, FitWarning, stacklevel=3)
    return msg


# ---------------------------------------------------------------------------- option groups
@dataclass(frozen=True, kw_only=True)
class RunOptions(Options):
    """``seed`` (None: torch's global RNG) and ``progress`` (tqdm bars)."""

    seed: int | None = option(None, random_seed)
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class OptimOptions(Options):
    """Options of every optimiser-driven fit.

    ``num_steps`` optimiser steps at learning rate ``lr``; ``batch_size`` (None: full batch
    up to 2048 points, else 256); ``accumulate`` micro-batches per step (same update, less
    memory); ``checkpoint_path`` with ``checkpoint_every``: write a checkpoint every that
    many steps and resume from the file when it exists.
    """

    num_steps: int = option(3000, positive_int)
    lr: float = option(0.01, positive)
    batch_size: int | None = option(None, optional(positive_int))
    accumulate: int = option(1, positive_int)
    checkpoint_path: str | None = None
    checkpoint_every: int | None = option(None, optional(positive_int))

    def validate(self) -> None:
        super().validate()
        if (self.checkpoint_path is None) != (self.checkpoint_every is None):
            raise ValueError("pass both checkpoint_path and checkpoint_every (or neither)")

    def resolved_batch_size(self, n: int) -> int | None:
        """The minibatch size for ``n`` data points; None means full batch."""
        return resolve_batch_size(self.batch_size, n)

    def optim_args(self, n: int) -> dict:
        """The engine's keywords these options set for ``n`` data points (and ``progress``)."""
        return {
            "batch_size": self.resolved_batch_size(n),
            "accumulate": self.accumulate,
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_every": self.checkpoint_every,
            # what a checkpoint belongs to besides the loop's own options and the data
            "fingerprint": {"method": getattr(self, "name", None), "seed": getattr(self, "seed", None)},
            "progress": self.progress,
        }


@dataclass(frozen=True, kw_only=True)
class ChainOptions(Options):
    """Options of every Markov chain sampler.

    ``num_samples`` draws kept per chain after ``warmup`` iterations, ``num_chains``
    chains, every ``thinning``-th draw kept; ``init`` (``"net"``: the network's own
    initialisation jittered by ``init_jitter``; ``"map"``: then ``map_steps`` of Adam
    first); ``warn``: warn when R-hat, ESS or divergences say the chains did not converge.
    """

    num_samples: int = option(500, positive_int)
    warmup: int = option(500, nonneg_int)
    num_chains: int = option(4, positive_int)
    thinning: int = option(1, positive_int)
    init: str | dict = "map"
    init_jitter: float = option(0.1, nonneg)
    map_steps: int = option(1000, positive_int)
    warn: bool = True

    # The two steps every chain backend shares (used by Backend subclasses only).
    def start_chains(self, potential: Potential, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """:func:`pbnn.engine.chains.init_chains` with these options; every rank starts all chains."""
        with torch.enable_grad(), distributed.rank_local():
            return chains.init_chains(
                potential,
                self.num_chains,
                self.init,
                jitter=self.init_jitter,
                map_steps=self.map_steps,
                generator=generator,
                progress=self.progress,
            )

    def chain_posterior(self, potential: Potential, result, fixed: dict, label: str, diverging=None, **info):
        """The Posterior of a :class:`pbnn.engine.chains.ChainResult`: ``info`` holds its final
        values (and, with ``warn``, the convergence diagnostics)."""
        info = {**result.final, **info}
        if self.warn:
            stuck_chain_warning(result.draws, label)
            info["diagnostics"] = convergence_warning(result.draws, diverging, label)
        samples = {k: v.detach() for k, v in potential.layout.constrain(result.draws).items()}
        # BatchNorm: each draw gets the statistics of the training inputs under its own weights
        predictor = predict_bn_refresh if potential.kind == "bnn" and has_batchnorm(potential.model.net) else None
        return self.posterior(
            potential, samples, sample_stats=result.stats, fixed=fixed, predictor=predictor, info=info
        )


# ---------------------------------------------------------------------------- registry
def register(name: str, cls: type[Backend] | None = None):
    """Register a backend class under ``name``; also usable as ``@register(name)``.

    Wraps the class's ``__init__`` so that the option names in ``renamed`` keep working,
    with a DeprecationWarning.
    """

    def add(cls: type[Backend]) -> type[Backend]:
        renamed = {k: v for c in reversed(cls.__mro__) for k, v in vars(c).get("renamed", {}).items()}
        if renamed and not getattr(cls.__init__, "_pbnn_renames", False):
            init = cls.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                for old, new in renamed.items():
                    if old in kwargs:
                        if new in kwargs:
                            raise ValueError(f"pass {new}= only ({old}= is its former name)")
                        warnings.warn(
                            f"{cls.__name__}: option {old}= is now {new}=; the old name will be removed "
                            "in the next release",
                            DeprecationWarning,
                            stacklevel=2,
                        )
                        kwargs[new] = kwargs.pop(old)
                init(self, *args, **kwargs)

            __init__._pbnn_renames = True
            cls.__init__ = __init__
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return add if cls is None else add(cls)


def backend_options(cls: type[Backend]) -> list[str]:
    """The option names a backend class accepts (declared fields, or ``__init__``'s parameters)."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    import inspect

    return [p for p in inspect.signature(cls).parameters]


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
    known = backend_options(cls)
    renamed = {k for c in cls.__mro__ for k in vars(c).get("renamed", {})}
    unknown = sorted(set(options) - set(known) - renamed)
    if unknown:
        raise ValueError(f"bad option for method {method!r}: unknown option(s) {unknown}; its options are {known}")
    return cls(**options)
