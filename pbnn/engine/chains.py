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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pbnn.core.data import LoaderData
from pbnn.engine import distributed
from pbnn.engine.optim import LoaderBatches, _peek_seed, batch_indices, fit_map, resolve_batch_size
from pbnn.kernels import hmc, mh, sgmcmc
from pbnn.kernels.hmc import Target

# compile="auto" compiles NUTS / HMC runs of at least this many iterations.
COMPILE_MIN_ITERATIONS = 500


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
):
    """Run ``warmup + num_samples * thinning`` iterations of ``step(state) -> (state, info)``.

    Warm-up calls ``adapt(state, warm, info, it) -> (state, warm)`` (``warm``: the adaptation
    state); then every ``thinning``-th ``position(state) [C, D]``
    is kept with its ``info`` (keys in ``averaged``: the mean over the ``thinning`` iterations).
    ``postfix(state, it, divergences)`` feeds the progress bar. Returns ``(draws [C, S, D],
    stats {name: [C, S]}, final state)``.
    """
    draws, stats, sums = [], {}, {}
    div = torch.zeros(position(state).shape[0], dtype=torch.long, device=position(state).device)
    total = warmup + num_samples * thinning
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    for it in bar:
        state, info = step(state)
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
) -> ChainResult:
    """Warm up and sample chains ``z0 [C, D]`` of ``kernel`` (``"nuts"`` or ``"hmc"``); see
    :func:`pbnn.kernels.hmc.adapt` for the warm-up. Final values: ``step_size``, ``inv_mass``."""
    state = hmc.init(fn, z0, generator, step_size)

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
    )
    return ChainResult(draws, stats, {"step_size": state.step_size, "inv_mass": state.inv_mass})


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
) -> ChainResult:
    """One SG-MCMC chain from ``z0 [D]``: ``warmup`` transitions discarded, then
    ``num_samples`` kept (one transition = gradient steps up to the schedule's next collection
    point). Draws ``[1, S, D]``; stats ``step_size`` (and ``cycle``); final ``gradient_steps``."""
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
    )
    return ChainResult(draws, stats, {"gradient_steps": [state.step]})


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
    if isinstance(potential.data, LoaderData):
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
    target = Target(
        lambda z, idx: potential.log_joint(z[0], idx)[None], compile=compile and potential.kind == "bnn", sanitise=False
    )
    rows_split = potential.kind == "bnn" or batch is not None  # a full-batch Pyro model cannot take a row subset

    def grad(z: torch.Tensor) -> torch.Tensor:
        idx = read() if read is not None else None
        if rows_split and distributed.is_active():
            z = z.detach().requires_grad_(True)
            g = distributed.data_parallel_grad(lambda rows: potential.log_joint(z, rows), z, idx, n)
            return g.neg_().div_(n)
        _, g = target(z[None], idx)
        return g[0].neg().div_(n)

    return grad


def should_compile(compile: bool | str, iterations: int, threshold: int = COMPILE_MIN_ITERATIONS) -> bool:
    """Resolve ``compile="auto"``: compile runs long enough to repay the compilation."""
    return iterations >= threshold if compile == "auto" else bool(compile)
