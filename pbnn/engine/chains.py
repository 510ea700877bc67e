"""The one chain runner (:func:`run_chains`: warm-up, thinning, statistics, divergences, progress
bar) and its drivers for NUTS / HMC, MH and SG-MCMC, plus the chains' starting points and
SG-MCMC's minibatch gradient.

Example:
    >>> import torch
    >>> from pbnn.engine.chains import sample_hmc
    >>> from pbnn.kernels.hmc import value_and_grad
    >>> target = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))   # standard normal in 2-D
    >>> out = sample_hmc("nuts", target, torch.zeros(2, 2), num_samples=100, warmup=50,
    ...                  generator=torch.Generator().manual_seed(0), progress=False)
    >>> out.draws.shape, sorted(out.stats)[:3]
    (torch.Size([2, 100, 2]), ['acceptance_rate', 'diverging', 'energy'])
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from tqdm.auto import tqdm

from pbnn.core.data import FitWarning, LoaderData
from pbnn.engine import distributed
from pbnn.engine.optim import LoaderBatches, _peek_seed, batch_indices, fit_map, resolve_batch_size
from pbnn.kernels import hmc, mh, sgmcmc
from pbnn.kernels.hmc import Target

# Former fixed threshold of compile="auto" (kept for callers of should_compile); "auto" now
# decides from measured costs (AutoCompile).
COMPILE_MIN_ITERATIONS = 500
# compile="auto" assumes a first compilation of this many seconds and a compiled iteration this
# many times faster than an eager one, until this process has measured both for the same graph.
COLD_COMPILE_SECONDS = 30.0
COMPILED_SPEEDUP = 3.0
# After one fit compiled a graph, a later fit of the same key reuses it: assume at most this
# many seconds (then measure). A traced Pyro model is recorded anew per fit: its cost is measured.
CACHED_COMPILE_SECONDS = 1.0
# A Pyro model's recorded graph (many small tensor ops) compiles about this many times slower.
TRACED_COMPILE_FACTOR = 3.0
# Measured (compile seconds, speedup) per graph key in this process: torch.compile reuses the
# graph of an earlier fit of the same model structure and shapes, so its compile cost is ~0.
_MEASURED: dict[tuple, tuple[float, float]] = {}
_COLD: list[float] = []  # first compilations measured in this process (a busy machine compiles slower)


def compile_pays(remaining_eager_seconds: float, compile_seconds: float, speedup: float) -> bool:
    """Whether compiling now shortens the rest of a run: its projected eager time exceeds the
    compilation plus the same work compiled (``speedup`` times faster than eager).

    A shorter run of the same settings has less left at every check, so it compiles later or
    never: with accurate estimates no run is slower than a longer one.

    Example:
        >>> compile_pays(100.0, compile_seconds=20.0, speedup=3.0), compile_pays(25.0, 20.0, 3.0)
        (True, False)
    """
    return remaining_eager_seconds * (1.0 - 1.0 / speedup) > compile_seconds


class AutoCompile:
    """``compile="auto"`` for one run of ``total`` iterations on a :class:`pbnn.kernels.hmc.Target`.

    The run starts eagerly. After iterations 1, 2, 4, 8, ... (few check points, so the switch,
    which changes the draws at float rounding, lands on the same iteration in most repeats) it
    projects the remaining eager time from the measured seconds per iteration and switches
    the target to compiled from the next iteration on when :func:`compile_pays`. The compile
    cost and the speedup are those measured in this process for the same ``key`` (model
    structure, shapes, sampler settings), else ``COLD_COMPILE_SECONDS`` and ``COMPILED_SPEEDUP``.
    ``work(info)`` (e.g. the leapfrog steps of a NUTS iteration) normalises the measured speedup.

    Example:
        >>> from pbnn.kernels.hmc import value_and_grad
        >>> auto = AutoCompile(value_and_grad(lambda z: -(z**2).sum(-1)), ("doc",), total=10)
        >>> auto.update(0, 0.001, {})   # a cheap eager iteration: compiling never pays
        False
    """

    def __init__(self, target, key: tuple, total: int, work: Callable[[dict], float] = lambda info: 1.0) -> None:
        self.target, self.key, self.total, self.work = target, key, total, work
        self.compiled_at = 0 if target.compile else None  # compile=True: measure only
        self.eager = [0.0, 0.0]  # seconds, work
        self.first = None  # (seconds, work) of the first compiled iteration: mostly compilation
        self.compiled = [0.0, 0.0]

    def estimates(self) -> tuple[float, float]:
        """(compile seconds, speedup) for this key: measured in this process, else the defaults
        (the cold compile time at least the last one measured in this process)."""
        if self.key in _MEASURED:
            return _MEASURED[self.key]
        cold = max([COLD_COMPILE_SECONDS, *_COLD[-1:]]) * (TRACED_COMPILE_FACTOR if self.target.trace else 1)
        return cold, COMPILED_SPEEDUP

    def update(self, it: int, seconds: float, info: dict) -> bool:
        """Record iteration ``it`` (0-based) of ``seconds``; return whether the next one compiles."""
        work = float(self.work(info))
        if self.compiled_at is None:
            self.eager[0] += seconds
            self.eager[1] += work
            done = it + 1
            if done & (done - 1) or done >= self.total:  # check at powers of two only
                return False
            cost, speedup = self.estimates()
            if compile_pays((self.total - done) * self.eager[0] / done, cost, speedup):
                self.target.compile = True
                self.compiled_at = done
                return True
            return False
        if not self.target.compile:  # compilation failed (Target warned): never retry this graph
            _MEASURED[self.key] = (math.inf, 1.0)
        elif self.first is None:
            self.first = (seconds, work)
        else:
            self.compiled[0] += seconds
            self.compiled[1] += work
            per_work = self.compiled[0] / max(self.compiled[1], 1e-12)
            cost = max(self.first[0] - self.first[1] * per_work, 0.0)
            speedup = self.estimates()[1]
            if self.eager[1] > 0 and per_work > 0:
                speedup = (self.eager[0] / self.eager[1]) / per_work
            if self.key not in _MEASURED and not self.target.trace:
                _COLD.append(cost)
            if not self.target.trace:  # torch.compile reuses this graph in the next fit
                cost = min(cost, CACHED_COMPILE_SECONDS)
            _MEASURED[self.key] = (cost, max(speedup, 1.0))
        return False


@dataclass
class ChainResult:
    """Draws ``[C, S, D]``, per-draw statistics ``{name: [C, S]}`` and per-chain final
    values (adapted step size, mass matrix, scale, gradient steps...)."""

    draws: torch.Tensor
    stats: dict[str, torch.Tensor]
    final: dict


def run_chains(
    step: Callable,
    state,
    *,
    num_samples: int,
    warmup: int,
    thinning: int = 1,
    adapt: Callable | None = None,
    warm=None,
    position: Callable = lambda s: s.z,
    averaged: tuple[str, ...] = (),
    postfix: Callable | None = None,
    every: int = 10,
    progress: bool = True,
    desc: str = "",
    auto: AutoCompile | None = None,
):
    """Run ``warmup + num_samples * thinning`` iterations of ``step(state) -> (state, info)``.

    Warm-up calls ``adapt(state, warm, info, it) -> (state, warm)`` (``warm``: the adaptation
    state); then every ``thinning``-th ``position(state) [C, D]``
    is kept with its ``info`` (keys in ``averaged``: the mean over the ``thinning`` iterations).
    ``postfix(state, it, divergences)`` feeds the progress bar. ``auto`` times every iteration
    and may switch the target to compiled (the bar then says "compiling"). Returns ``(draws
    [C, S, D], stats {name: [C, S]}, final state)``.
    """
    draws, stats, sums = [], {}, {}
    div = torch.zeros(position(state).shape[0], dtype=torch.long, device=position(state).device)
    total = warmup + num_samples * thinning
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    compiling = auto is not None and auto.compiled_at == 0
    for it in bar:
        if compiling and progress:
            bar.set_description(f"{desc} (compiling)")
        t = time.perf_counter()
        state, info = step(state)
        if auto is not None:
            if compiling and progress:
                bar.set_description(desc)
            compiling = auto.update(it, time.perf_counter() - t, info)
        if it < warmup:
            if adapt is not None:
                state, warm = adapt(state, warm, info, it)
        else:
            k = it - warmup
            for key in averaged:
                sums[key] = sums.get(key, 0) + info[key]
            if (k + 1) % thinning == 0:
                draws.append(position(state))
                for key, value in info.items():
                    stats.setdefault(key, []).append(sums.pop(key) / thinning if key in averaged else value)
                if "diverging" in info:
                    div += info["diverging"].to(torch.long)
        if progress and postfix is not None and (it % every == 0 or it == total - 1):
            bar.set_postfix(postfix(state, it, div))
    return torch.stack(draws, 1), {k: torch.stack(v, 1) for k, v in stats.items()}, state


def _fmt(values: torch.Tensor, spec: str = ".2g") -> str:
    return " ".join(f"{float(v):{spec}}" for v in values)


def sample_hmc(
    kernel: str,
    fn: Target,
    z0: torch.Tensor,
    *,
    num_samples: int,
    warmup: int,
    thinning: int = 1,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    num_leapfrog_steps: int = 20,
    step_size: float | None = None,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "NUTS",
    compile_key: tuple | None = None,
) -> ChainResult:
    """Warm up and sample chains ``z0 [C, D]`` of ``kernel`` (``"nuts"`` or ``"hmc"``); see
    :func:`pbnn.kernels.hmc.adapt` for the warm-up. Final values: ``step_size``, ``inv_mass``.

    ``compile_key`` (with a :class:`~pbnn.kernels.hmc.Target` ``fn``): decide and measure
    compilation during the run (:class:`AutoCompile`; an eager target may switch to compiled)."""
    state = hmc.init(fn, z0, generator, step_size)
    auto = None
    if compile_key is not None and isinstance(fn, Target):
        total = warmup + num_samples * thinning
        auto = AutoCompile(fn, (kernel, max_tree_depth, num_leapfrog_steps, *compile_key), total, _lockstep_steps)

    def step(s):
        return hmc.step(
            s, fn, generator, kernel=kernel, max_tree_depth=max_tree_depth, num_leapfrog_steps=num_leapfrog_steps
        )

    adapt = functools.partial(
        hmc.adapt, warmup=warmup, fn=fn, gen=generator, target_accept=target_accept, adapt_step_size=adapt_step_size
    )

    def postfix(s, it, div):
        phase = "warmup" if it < warmup else "sample"
        return {"phase": phase, "step": _fmt(s.step_size), "div": " ".join(str(int(d)) for d in div)}

    draws, stats, state = run_chains(
        step,
        state,
        num_samples=num_samples,
        warmup=warmup,
        thinning=thinning,
        adapt=adapt,
        warm=hmc.warmup_init(state, warmup, adapt_mass_matrix),
        postfix=postfix,
        progress=progress,
        desc=desc,
        auto=auto,
    )
    return ChainResult(draws, stats, {"step_size": state.step_size, "inv_mass": state.inv_mass})


def tree_depth_warning(tree_depth: torch.Tensor, max_tree_depth: int, label: str = "NUTS") -> float:
    """Warn (:class:`pbnn.core.data.FitWarning`) when most kept NUTS transitions hit
    ``max_tree_depth``: their trajectories were cut before a U-turn, so each draw moves less
    than NUTS intends. Returns the fraction of such transitions.

    Example:
        >>> tree_depth_warning(torch.tensor([[3, 2, 1, 3]]), max_tree_depth=3)
        0.5
    """
    hit = float((tree_depth >= max_tree_depth).double().mean()) if tree_depth.numel() else 0.0
    if hit > 0.5:
        warnings.warn(
            f"{label}: {hit:.0%} of the transitions hit max_tree_depth={max_tree_depth} (trajectories cut "
            f"before they U-turned, so the chains explore slowly); raise max_tree_depth (e.g. to "
            f"{max_tree_depth + 2}), or standardise x and y / reparameterise the model so that the posterior's "
            "scales are closer to each other",
            FitWarning,
            stacklevel=3,
        )
    return hit


def _lockstep_steps(info: dict) -> float:
    # Chains step in lockstep: an iteration costs as many vectorised leapfrogs as its longest chain.
    return float(info["n_steps"].max())


def sample_mh(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    num_samples: int,
    warmup: int,
    thinning: int = 1,
    proposal_scale: float = 0.1,
    target_accept: float = mh.TARGET_ACCEPT,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "MH",
) -> ChainResult:
    """Adaptive random-walk Metropolis for chains ``z0 [C, D]`` of ``log_density(z [C, D]) -> [C]``.

    Stats ``acceptance_rate`` (the mean acceptance probability over the ``thinning`` steps
    behind each kept draw) and ``lp``; final value ``scale`` (the global proposal scale).

    Example:
        >>> import torch
        >>> out = sample_mh(lambda z: -0.5 * (z**2).sum(-1), torch.zeros(2, 3), num_samples=100, warmup=100,
        ...                 generator=torch.Generator().manual_seed(0), progress=False)
        >>> out.draws.shape, out.stats["acceptance_rate"].shape
        (torch.Size([2, 100, 3]), torch.Size([2, 100]))
    """
    draws, stats, state = run_chains(
        lambda s: mh.step(s, log_density, generator),
        mh.init(log_density, z0, proposal_scale),
        num_samples=num_samples,
        warmup=warmup,
        thinning=thinning,
        adapt=functools.partial(mh.adapt, target_accept=target_accept),
        warm=mh.warmup_init(warmup),
        averaged=("acceptance_rate",),
        every=50,
        progress=progress,
        desc=desc,
        postfix=lambda s, it, div: {"scale": _fmt(s.log_s.exp())},
    )
    return ChainResult(draws, stats, {"scale": state.log_s.exp()})


def sample_sgmcmc(
    grad_fn: Callable[[torch.Tensor], torch.Tensor],
    rule: sgmcmc.Rule,
    schedule: sgmcmc.Schedule,
    z0: torch.Tensor,
    *,
    num_samples: int,
    warmup: int,
    generator: torch.Generator,
    name: str = "SG-MCMC",
    progress: bool = True,
    compile_key: tuple | None = None,
) -> ChainResult:
    """One SG-MCMC chain from ``z0 [D]``: ``warmup`` transitions discarded, then
    ``num_samples`` kept (one transition = gradient steps up to the schedule's next collection
    point). Draws ``[1, S, D]``; stats ``step_size`` (and ``cycle``); final ``gradient_steps``.
    ``compile_key``: decide compilation of ``grad_fn.target`` during the run (:class:`AutoCompile`)."""
    target = getattr(grad_fn, "target", None)
    auto = None
    if compile_key is not None and target is not None:
        auto = AutoCompile(target, ("sgmcmc", *compile_key), warmup + num_samples)
    draws, stats, state = run_chains(
        lambda s: sgmcmc.transition(s, grad_fn, rule, schedule, generator, name),
        sgmcmc.init(rule, z0),
        num_samples=num_samples,
        warmup=warmup,
        position=lambda s: s.z[None],
        every=1,
        progress=progress,
        postfix=lambda s, it, div: {"lr": f"{s.lr:.2e}", "grad steps": s.step},
        desc=name,
        auto=auto,
    )
    return ChainResult(draws, stats, {"gradient_steps": [state.step]})


def compile_key(potential) -> tuple:
    """What a compiled graph of ``potential`` depends on, for :class:`AutoCompile`'s record of
    measured costs: the model's structure and the shapes of the parameters and data."""
    model = potential.model
    structure = repr(model.net) if potential.kind == "bnn" else getattr(model, "__qualname__", type(model).__name__)
    data = potential.data
    return (potential.kind, structure, tuple(potential.sizes), tuple(data.x.shape), tuple(data.y.shape), data.x.dtype)


# ---------------------------------------------------------------------------- starting points
def chain_generator(device: torch.device | str | None = None) -> torch.Generator:
    """The fit's generator on ``device`` (the model's: kernels draw where the chains live),
    seeded from torch's (already seeded) CPU RNG."""
    return torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, ()).item()))


def check_chain_options(backend) -> None:
    """Checks NUTS, HMC and MH share: ``init`` and the full-batch ``batch_size``."""
    if not (isinstance(backend.init, dict) or backend.init in ("net", "map")):
        raise ValueError(f"init must be one of ('net', 'map') or a dict of site values, got {backend.init!r}")
    if backend.batch_size is not None:
        raise ValueError(
            f"{backend.name} is full-batch: its Metropolis correction and Hamiltonian dynamics need the exact "
            "log-likelihood of all data, and a minibatch estimate would bias the chain without an error "
            "bound. Drop batch_size=, or use a stochastic-gradient sampler (method='sgld' or 'sghmc') "
            "for data too large for full-batch gradients."
        )


def init_chains(
    potential, num_chains: int, init, *, jitter: float, map_steps: int, generator: torch.Generator, progress: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Starting points ``z0 [C, D]`` and the fixed point-estimate parameters.

    ``init="net"``: the model's initialisation plus ``N(0, jitter^2)`` per chain (unconstrained);
    ``"map"``: then ``map_steps`` of Adam on all chains (:func:`pbnn.engine.optim.fit_map`); a
    dict: site values to start from. Point-estimate parameters are fitted by that MAP warm start
    (also without ``"map"``) and then held fixed.
    """
    base = potential.initial_z()
    if isinstance(init, dict):  # given sites override the default start
        unknown = set(init) - set(potential.names)
        if unknown:
            raise ValueError(f"init has unknown sites {sorted(unknown)}; the latent sites are {potential.names}")
        values = potential.layout.constrain(base)
        base = potential.pack(
            {**values, **{k: torch.as_tensor(v, dtype=base.dtype, device=base.device) for k, v in init.items()}}
        )
    z0 = base.expand(num_chains, -1) + jitter * torch.randn(
        num_chains, base.shape[-1], generator=generator, dtype=base.dtype, device=base.device
    )
    fixed = potential.fixed
    if (isinstance(init, str) and init == "map") or fixed:
        z0, fixed, _ = fit_map(
            potential,
            z0,
            num_steps=map_steps,
            lr=0.01,
            fixed=fixed,
            jacobian=True,
            desc="MAP warm start",
            progress=progress,
        )
    return z0, fixed


def chain_start(potential, chain: int) -> torch.Tensor:
    """SG-MCMC chain ``chain``'s start ``[D]``: chain 0 at :meth:`Potential.initial_z`; later chains
    re-run a BNN's ``reset_parameters()`` or draw ``U(-2, 2)`` (Pyro's ``init_to_uniform``), from
    torch's global RNG."""
    z = potential.initial_z()
    if chain == 0:
        return z
    if potential.kind != "bnn":
        return torch.rand(z.shape, dtype=z.dtype, device=z.device) * 4 - 2
    model = potential.model
    net = copy.deepcopy(model.net)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    values, params = potential.layout.constrain(z), dict(net.named_parameters())
    values.update({n: params[n].detach() for n in model.bayesian_names})
    return potential.pack(values)


def warm_start(potential, z: torch.Tensor, *, num_steps: int, batch_size: int | None = None, progress: bool = False):
    """SG-MCMC's ``init="map"``: ``num_steps`` of Adam on the sampler's own (minibatch) target from ``z``.

    For a :class:`pbnn.BNN` only the weights move: a learned noise scale's joint mode is degenerate
    (it collapses onto the training residuals, where no step size is stable). For a Pyro model
    every latent site moves.
    """
    moving = None
    if potential.kind == "bnn":
        weights = set(potential.model.bayesian_names)
        moving = torch.cat(
            [torch.full((s,), n in weights, device=z.device) for n, s in zip(potential.names, potential.sizes)]
        )
    z, _, _ = fit_map(
        potential,
        z,
        num_steps=num_steps,
        lr=0.01,
        batch_size=resolve_batch_size(batch_size, len(potential.data)),
        train_fixed=False,
        moving=moving,
        jacobian=True,
        desc="MAP warm start",
        progress=progress,
    )
    if not torch.isfinite(z).all():
        raise ValueError("the MAP warm start diverged (NaN/inf); standardise x and y, or pass init='net'")
    return z


# ---------------------------------------------------------------------------- SG-MCMC gradient
def sg_gradient(potential, batch_size: int | None, generator: torch.Generator, compile: bool = False, method="sgld"):
    """``z [D] ->`` gradient of the per-datum minibatch loss ``-log p~(z) / N``, minibatches drawn
    from ``generator`` (data-parallel over ranks), or read from the loader as it is when the
    potential's data is a :class:`pbnn.data.LoaderData` (uncompiled: batch shapes vary).
    NaN/inf must reach the divergence guard."""
    n = len(potential.data)
    loader = isinstance(potential.data, LoaderData)
    if loader:
        distributed.check_loader(potential.data.sharded, split=distributed.is_active())
        read = LoaderBatches(potential.data, _peek_seed(generator))  # leaves the noise stream as it is
        batch, compile = True, False
    else:
        batch = resolve_batch_size(batch_size, n)
        potential.require(method, minibatch=batch is not None)
        if batch and distributed.is_active():  # data-parallel: each rank takes its share of a K-times larger batch
            batch *= distributed.world_size()
        stream = batch_indices(n, batch, generator) if batch else None
        read = (lambda: next(stream)) if stream is not None else None

    def log_density(z, idx):
        return potential.log_joint(z[0], idx)[None]

    if potential.kind != "bnn":
        # A Pyro model's trace is recorded as a graph of tensor ops before compiling (Target's
        # trace=); sampling never needs Pyro's argument validation (its NaN checks read values).
        def log_density(z, idx):  # noqa: F811
            with pyro.validation_enabled(False):
                return potential.log_joint(z[0], idx)[None]

    target = Target(log_density, compile=compile, sanitise=False, trace=potential.kind != "bnn")
    rows_split = potential.kind == "bnn" or batch is not None  # a full-batch Pyro model cannot take a row subset

    def grad(z: torch.Tensor) -> torch.Tensor:
        idx = read() if read is not None else None
        if rows_split and distributed.is_active():
            z = z.detach().requires_grad_(True)
            g = distributed.data_parallel_grad(lambda rows: potential.log_joint(z, rows), z, idx, n)
            return g.neg_().div_(n)
        _, g = target(z[None], idx)
        return g[0].neg().div_(n)

    if not loader:  # loader batches vary in shape: they stay eager
        grad.target = target  # compile="auto" switches it on during the run
    return grad


def should_compile(compile: bool | str, iterations: int, threshold: int = COMPILE_MIN_ITERATIONS) -> bool:
    """Resolve ``compile="auto"`` by a fixed run length (superseded inside pbnn by
    :class:`AutoCompile`, which decides from measured costs)."""
    return iterations >= threshold if compile == "auto" else bool(compile)
