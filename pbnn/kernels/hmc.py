"""Hamiltonian kernels on a batch of chains ``z [C, D]``: NUTS and static HMC transitions and
Stan's warm-up adaptation, as ``init`` / ``step`` on NamedTuple state (the loop belongs to
:func:`pbnn.engine.chains.run_chains`). All chains take their leapfrog steps in lockstep
through one vectorised gradient; a chain whose trajectory has ended is masked out.

Example:
    >>> import torch
    >>> from pbnn.kernels import hmc
    >>> target = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))   # standard normal in 2-D
    >>> gen = torch.Generator().manual_seed(0)
    >>> state = hmc.init(target, torch.zeros(2, 2), gen)
    >>> state, info = hmc.step(state, target, gen)
    >>> state.z.shape, sorted(info)[:3]
    (torch.Size([2, 2]), ['acceptance_rate', 'diverging', 'energy'])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

GradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

MAX_ENERGY_ERROR = 1000.0  # Stan's divergence threshold on H(z, r) - H(z0, r0)


# ---------------------------------------------------------------------------- targets
class Target:
    """A batched log density and its gradient: ``target(z [C, D]) -> (logp [C], grad [C, D])``.

    Non-finite densities become ``-inf`` with a zero gradient (a divergence, not a poisoned chain).
    ``compile=True`` fuses the gradient with the sampler's inner step in one ``torch.compile``
    graph (tens of microseconds per leapfrog step instead of a millisecond, for ~10 s of
    compilation, once per process and shape); if compilation fails, pbnn warns once and runs
    eagerly. The flag may be switched on during a run (``compile="auto"``,
    :class:`pbnn.engine.chains.AutoCompile`).

    ``trace=True`` (for log densities that run Python machinery on every call, such as a Pyro
    model's trace): before compiling, one chain's log density is recorded as a graph of tensor
    operations (``torch.fx`` ``make_fx``) and vectorised over chains with ``torch.func.vmap``;
    the graph is checked against the eager density at two points, and a density whose Python
    control flow depends on ``z`` (the check fails) runs eagerly with a warning.
    """

    def __init__(
        self,
        log_density: Callable[..., torch.Tensor],
        compile: bool = False,
        sanitise: bool = True,
        trace: bool = False,
    ) -> None:
        self.log_density = log_density
        self.compile = bool(compile)
        self.sanitise = sanitise
        self.trace = trace
        self._traced: Callable | None = None
        self._cache: dict[str, Callable] = {}

    def raw(self, z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """Value and gradient (extra ``args`` go to the log density, e.g. a minibatch index),
        made finite unless ``sanitise=False`` (see the class docstring)."""
        if torch.compiler.is_compiling():  # torch.func traces into the compiled graph
            log_density = self._traced or self.log_density
            vg = torch.func.grad_and_value(lambda zz: _sum_with_aux(log_density(zz, *args)), has_aux=True)
            g, (_, lp) = vg(z)
        else:  # eager: plain autograd has less per-call overhead
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                lp = self.log_density(zz, *args)
                (g,) = torch.autograd.grad(lp.sum(), zz)
            lp = lp.detach()
        if not self.sanitise:
            return lp, g
        ok = torch.isfinite(lp)
        lp = torch.where(ok, lp, torch.full_like(lp, -math.inf))
        g = torch.where(ok[:, None], torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(g))
        return lp, g

    def eager(self, z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`raw` without compilation: for the few calls outside the sampler's inner loop
        (start, step-size search, adaptation), which are not worth a graph of their own."""
        return self.raw(z.detach(), *args)

    def prepare(self, z: torch.Tensor, *args) -> None:
        """With ``compile`` and ``trace``: record the log density as a graph at the example
        ``z [C, D]`` (once); on a mismatch with the eager density, warn and stay eager."""
        if not (self.compile and self.trace) or self._traced is not None:
            return
        try:
            self._traced = _trace_density(self.log_density, z.detach(), args)
        except Exception as err:  # noqa: BLE001 - any tracing failure: stay eager
            self.compile = False
            warnings.warn(
                f"pbnn could not record the model's log density as a graph ({type(err).__name__}: {err}); "
                "this sampler runs eagerly",
                stacklevel=3,
            )

    def compiled(self, name: str, fn: Callable) -> Callable:
        """``fn`` compiled once per name while ``compile`` is on (eager otherwise or on failure)."""
        if name not in self._cache:
            compiled = torch.compile(fn, dynamic=False)

            def run(*args):
                if self.compile:
                    try:
                        return compiled(*args)
                    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, keep going
                        self.compile = False
                        warnings.warn(
                            f"torch.compile failed ({type(err).__name__}: {err}); pbnn runs this sampler eagerly",
                            stacklevel=2,
                        )
                return fn(*args)

            self._cache[name] = run
        return self._cache[name]

    def __call__(self, z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compile:
            return self.raw(z.detach(), *args)
        self.prepare(z, *args)
        return self.compiled("value_and_grad", self.raw)(z.detach(), *args)


def _trace_density(log_density: Callable, z: torch.Tensor, args: tuple) -> Callable:
    """One chain's ``log_density`` as a ``make_fx`` graph, vmapped over chains; checked against
    the eager density at ``z`` and at a perturbed ``z`` (a graph records one path through the
    Python code, so a density that branches on ``z`` differs)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def one(z1, *targs):
        full = list(args)
        for i, a in zip(tensors, targs):
            full[i] = a
        return log_density(z1[None], *full)[0]

    targs = [args[i] for i in tensors]
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)  # value checks branch on data
    try:
        graph = make_fx(one)(z[0], *targs)
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
    batched = torch.func.vmap(graph, in_dims=(0,) + (None,) * len(targs))

    def traced(zz, *call_args):
        return batched(zz, *[call_args[i] for i in tensors])

    shift = torch.linspace(-0.5, 0.5, z.shape[-1], dtype=z.dtype)
    with torch.no_grad():
        for point in (z, z + shift):
            want, got = log_density(point, *args), traced(point, *args)
            ok = torch.isfinite(want)
            scale = 1e-4 * (1 + want[ok].abs())
            if not (torch.equal(ok, torch.isfinite(got)) and bool(((want[ok] - got[ok]).abs() <= scale).all())):
                raise ValueError("the recorded graph disagrees with the model (Python control flow that depends on z?)")
    return traced


def _sum_with_aux(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lp.sum(), lp.detach()


def value_and_grad(
    log_density: Callable[[torch.Tensor], torch.Tensor], compile: bool = False, trace: bool = False
) -> Target:
    """``z [C, D] -> (logp [C], grad [C, D])`` by one reverse pass over all chains (a :class:`Target`).

    Example:
        >>> import torch
        >>> lp, g = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))(torch.ones(3, 2))
        >>> lp.tolist(), g[0].tolist()
        ([-1.0, -1.0, -1.0], [-1.0, -1.0])
    """
    return Target(log_density, compile, trace=trace)


# ---------------------------------------------------------------------------- integrator
def leapfrog(z, r, g, eps, inv_mass, fn: GradFn):
    """One leapfrog step of size ``eps [C]`` (negative: backwards in time) for every chain."""
    e = eps[:, None]
    r = r + (0.5 * e) * g
    z = z + e * (inv_mass * r)
    lp, g = fn(z)
    r = r + (0.5 * e) * g
    return z, r, g, lp


def kinetic(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.linalg.vecdot(r, inv_mass * r)


def _where(mask: torch.Tensor, a: dict, b: dict, keys) -> dict:
    """Per-chain select between two dicts of batched tensors (``a`` where ``mask``)."""
    if bool(mask.all()):
        return {k: a[k] for k in keys}
    if not bool(mask.any()):
        return {k: b[k] for k in keys}
    m1, m2 = mask, mask[:, None]
    return {k: torch.where(m2 if a[k].dim() == 2 else m1, a[k], b[k]) for k in keys}


def _no_uturn(ps_minus, ps_plus, rho) -> torch.Tensor:
    """Generalised no-U-turn criterion (Betancourt 2017): both ends still move along ``rho``
    (``ps`` = inverse mass times momentum at each end)."""
    return (torch.linalg.vecdot(ps_minus, rho) > 0) & (torch.linalg.vecdot(ps_plus, rho) > 0)


# ---------------------------------------------------------------------------- NUTS
_END = ("z", "r", "g", "lp", "ps")
_PROP = ("zp", "lpp", "gp")
_LEAF_STATE = _END + _PROP + ("log_w", "rho", "sum_acc", "n", "div", "running", "r_first", "ps_first")


@functools.cache
def _checkpoint_tables(max_tree_depth: int, compiled: bool, device: torch.device | None = None) -> list[tuple]:
    """Per leaf index ``k`` of a subtree: where to store a U-turn checkpoint (even ``k``), which
    checkpoints to check against (odd ``k``), and whether it is the first leaf; as masks over
    the ``K`` checkpoints (``compiled``) or as Python ints.

    Leaf ``k`` closes the subtrees of sizes 2, 4, ..., 2**t (t = trailing ones of ``k``); their
    first leaves were stored at indices ``idx_max - t + 1 .. idx_max`` (Phan, Pradhan and
    Jankowiak 2019, as in NumPyro's iterative NUTS).
    """
    K = max(max_tree_depth, 1)
    out = []
    for k in range(2 ** max(max_tree_depth - 1, 0)):
        store, check = None, []
        if k % 2 == 0:
            store = bin(k).count("1")
        else:
            idx_max = bin(k >> 1).count("1")
            trailing_ones = (k ^ (k + 1)).bit_length() - 1
            check = list(range(idx_max - trailing_ones + 1, idx_max + 1))
        if compiled:
            st, ch = torch.zeros(K, dtype=torch.bool, device=device), torch.zeros(K, dtype=torch.bool, device=device)
            if store is not None:
                st[store] = True
            ch[check] = True
            out.append((st, ch, torch.tensor(k == 0, device=device)))
        else:
            out.append((store, check, k == 0))
    return out


def _leaf_step(grad: GradFn, compiled: bool):
    """One leaf of a NUTS subtree as one function of tensors (compilable with the gradient): a
    leapfrog step for the running chains, progressive multinomial sampling, the momentum sum,
    U-turn checkpoints (compiled: masks over all ``K``; eager: only this leaf's) and the stop."""

    def leaf(state: tuple, ck: tuple, u, leaf_index: int, v_eps, inv_mass, H0):
        z, r, g, lp, ps, zp, lpp, gp, log_w, rho, sum_acc, n, div, running, r_first, ps_first = state
        ck_r, ck_ps, ck_rho = ck
        z1, r1, g1, lp1 = leapfrog(z, r, g, v_eps, inv_mass, grad)
        ps1 = inv_mass * r1
        dH = torch.nan_to_num(0.5 * torch.linalg.vecdot(r1, ps1) - lp1 - H0, nan=math.inf)
        m, m2 = running, running[:, None]
        # Multinomial sampling, progressively: leaf k replaces the proposal with probability
        # w_k / (w_0 + ... + w_k), which leaves it distributed as w over the subtree's leaves.
        new_log_w = torch.where(m, torch.logaddexp(log_w, -dH), log_w)
        take = m & (u < torch.exp(-dH - new_log_w))
        zp = torch.where(take[:, None], z1, zp)
        lpp = torch.where(take, lp1, lpp)
        gp = torch.where(take[:, None], g1, gp)
        rho = torch.where(m2, rho + r1, rho)
        sum_acc = sum_acc + torch.where(m, torch.exp(torch.clamp(-dH, max=0.0)), torch.zeros_like(dH))
        n = n + m.to(n.dtype)
        diverged = m & (dH > MAX_ENERGY_ERROR)
        store, check, first = leaf_index
        if compiled:  # masks over all checkpoints: the same graph for every leaf
            first_here = first & m2
            r_first = torch.where(first_here, r1, r_first)
            ps_first = torch.where(first_here, ps1, ps_first)
            put = store[:, None, None] & m[None, :, None]
            ck_r = torch.where(put, r1[None], ck_r)
            ck_ps = torch.where(put, ps1[None], ck_ps)
            ck_rho = torch.where(put, rho[None], ck_rho)
            # Generalised no-U-turn criterion on every closing sub-subtree (checkpoint i to here).
            turning = (check[:, None] & ~_no_uturn(ck_ps, ps1[None], rho[None] - ck_rho + ck_r)).any(0)
        else:  # eager: touch only this leaf's checkpoints
            if first:
                r_first, ps_first = r1, ps1
            if store is not None:
                ck_r, ck_ps, ck_rho = ck_r.clone(), ck_ps.clone(), ck_rho.clone()
                ck_r[store], ck_ps[store], ck_rho[store] = r1, ps1, rho
            turning = torch.zeros_like(m)
            if check:
                sl = slice(check[0], check[-1] + 1)
                turning = (~_no_uturn(ck_ps[sl], ps1[None], rho[None] - ck_rho[sl] + ck_r[sl])).any(0)
        moved = [torch.where(m2, a, b) for a, b in ((z1, z), (r1, r), (g1, g))]
        state = (*moved, torch.where(m, lp1, lp), torch.where(m2, ps1, ps), zp, lpp, gp, new_log_w, rho)
        state += (sum_acc, n, div | diverged, m & ~diverged & ~turning, r_first, ps_first)
        return state, (ck_r, ck_ps, ck_rho)

    return leaf


def _build_subtree(
    leaf, compiled: bool, start: dict, v_eps, depth: int, H0, active, inv_mass, gen, max_tree_depth: int
) -> dict:
    """A subtree of up to ``2**depth`` leapfrog steps from ``start``, built iteratively: its far
    end, first leaf's momentum, multinomial proposal, ``log_w``, ``rho``, ``stop``, ``div``,
    summed acceptance statistic and step count (the keys of ``_LEAF_STATE``)."""
    z = start["z"]
    C, D = z.shape
    K = max(max_tree_depth, 1)
    zeros = z.new_zeros(C, D)
    state = tuple(start[k] for k in ("z", "r", "g", "lp", "ps", "z", "lp", "g"))
    state += (z.new_full((C,), -math.inf), zeros, z.new_zeros(C))
    state += (z.new_zeros(C, dtype=torch.long), z.new_zeros(C, dtype=torch.bool), active.clone(), zeros, zeros)
    ck = tuple(z.new_zeros(K, C, D) for _ in range(3))  # distinct: no aliasing guard
    tables = _checkpoint_tables(max_tree_depth, compiled, z.device if compiled else None)
    for k in range(2**depth):
        u = torch.rand(C, generator=gen, dtype=z.dtype, device=z.device)
        state, ck = leaf(state, ck, u, tables[k], v_eps, inv_mass, H0)
        if not bool(state[13].any()):  # every chain stopped (or was inactive)
            break
    out = dict(zip(_LEAF_STATE, state))
    out["stop"] = active & ~out.pop("running")
    return out


def nuts_step(z, lp, g, eps, inv_mass, fn: GradFn, gen, max_tree_depth: int = 10):
    """One NUTS transition for every chain: the trajectory doubles up to ``max_tree_depth`` times;
    subtrees are built leaf by leaf with U-turn checkpoints (Phan et al. 2019) and merged by
    biased progressive sampling with Stan's generalised U-turn criterion.

    Args:
        z, lp, g: current positions ``[C, D]``, log densities ``[C]`` and gradients ``[C, D]``.
        eps: step sizes ``[C]``; inv_mass: diagonal inverse mass matrices ``[C, D]``.
        fn: batched target (:func:`value_and_grad`); gen: torch.Generator.

    Returns:
        ``(z, lp, g, stats)`` with stats ``diverging``, ``acceptance_rate`` (mean Metropolis
        acceptance over the trajectory, the quantity dual averaging targets), ``tree_depth``,
        ``n_steps`` and ``energy`` (the Hamiltonian at the start, with the fresh momentum),
        each ``[C]``.
    """
    C = z.shape[0]
    if isinstance(fn, Target):
        fn.prepare(z)  # a traced density is recorded before the first compiled leaf
    compiled = isinstance(fn, Target) and fn.compile
    leaf = fn.compiled("nuts_leaf", _leaf_step(fn.raw, True)) if compiled else _leaf_step(fn, False)
    r0 = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device) / inv_mass.sqrt()
    ps0 = inv_mass * r0
    H0 = 0.5 * torch.linalg.vecdot(r0, ps0) - lp
    left = {"z": z, "r": r0, "g": g, "lp": lp, "ps": ps0}
    right = dict(left)
    sample = {"zp": z, "lpp": lp, "gp": g}
    log_w = z.new_zeros(C)
    rho = r0
    active = torch.isfinite(lp)
    depth = z.new_zeros(C, dtype=torch.long)
    n = z.new_zeros(C, dtype=torch.long)
    div = z.new_zeros(C, dtype=torch.bool)
    sum_acc = z.new_zeros(C)
    for j in range(max_tree_depth):
        forward = torch.rand(C, generator=gen, dtype=z.dtype, device=z.device) < 0.5
        v = forward.to(z.dtype) * 2 - 1
        start = _where(forward, right, left, _END)
        far_old = torch.where(forward[:, None], left["ps"], right["ps"])
        sub = _build_subtree(leaf, compiled, start, v * eps, j, H0, active, inv_mass, gen, max_tree_depth)
        ok = active & ~sub["stop"]
        # Biased progressive sampling (Betancourt 2017): favour the new subtree.
        accept = ok & (torch.rand(C, generator=gen, dtype=z.dtype, device=z.device) < torch.exp(sub["log_w"] - log_w))
        sample = _where(accept, sub, sample, _PROP)
        log_w = torch.where(ok, torch.logaddexp(log_w, sub["log_w"]), log_w)
        rho_new = rho + sub["rho"]
        no_turn = (
            _no_uturn(far_old, sub["ps"], rho_new)
            & _no_uturn(far_old, sub["ps_first"], rho + sub["r_first"])
            & _no_uturn(start["ps"], sub["ps"], start["r"] + sub["rho"])
        )
        right = _where(ok & forward, sub, right, _END)
        left = _where(ok & ~forward, sub, left, _END)
        rho = torch.where(ok[:, None], rho_new, rho)
        depth = depth + ok
        div = div | (active & sub["div"])
        sum_acc = sum_acc + sub["sum_acc"]
        n = n + sub["n"]
        active = ok & no_turn
        if not bool(active.any()):
            break
    stats = {"diverging": div, "acceptance_rate": sum_acc / n.clamp(min=1), "tree_depth": depth, "n_steps": n}
    stats["energy"] = H0  # the Hamiltonian the trajectory conserves (ArviZ's energy: BFMI, plot_energy)
    return sample["zp"], sample["lpp"], sample["gp"], stats


# ---------------------------------------------------------------------------- HMC
def hmc_step(z, lp, g, eps, inv_mass, fn: GradFn, gen, num_steps: int = 20):
    """One static HMC transition (``num_steps`` leapfrog steps, Metropolis correction) per chain."""
    r0 = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device) / inv_mass.sqrt()
    H0 = -lp + kinetic(r0, inv_mass)
    zn, r, gn, lpn = z, r0, g, lp
    for _ in range(num_steps):
        zn, r, gn, lpn = leapfrog(zn, r, gn, eps, inv_mass, fn)
    dH = -lpn + kinetic(r, inv_mass) - H0
    dH = torch.where(torch.isnan(dH), torch.full_like(dH, math.inf), dH)
    acc = torch.exp(torch.clamp(-dH, max=0.0))
    accept = torch.rand(acc.shape, generator=gen, dtype=z.dtype, device=z.device) < acc
    z = torch.where(accept[:, None], zn, z)
    lp = torch.where(accept, lpn, lp)
    g = torch.where(accept[:, None], gn, g)
    steps = z.new_full((z.shape[0],), num_steps, dtype=torch.long)
    stats = {"diverging": dH > MAX_ENERGY_ERROR, "acceptance_rate": acc, "n_steps": steps, "energy": H0}
    return z, lp, g, stats


# ---------------------------------------------------------------------------- adaptation
class DualAveragingState(NamedTuple):
    """Nesterov dual averaging of ``log(step size)`` per chain (Hoffman & Gelman 2014)."""

    mu: torch.Tensor
    h_bar: torch.Tensor
    log_eps_bar: torch.Tensor
    t: int


def dual_averaging_init(eps0: torch.Tensor) -> DualAveragingState:
    """Start (or restart) dual averaging around ``10 * eps0``."""
    return DualAveragingState(torch.log(10 * eps0), torch.zeros_like(eps0), torch.zeros_like(eps0), 0)


def dual_averaging_update(
    state: DualAveragingState,
    accept_stat: torch.Tensor,
    target: float,
    gamma: float = 0.05,
    t0: float = 10.0,
    kappa: float = 0.75,
) -> tuple[DualAveragingState, torch.Tensor]:
    """Feed one iteration's mean acceptance statistic; return the state and the next step
    sizes (Stan's constants). ``state.log_eps_bar.exp()`` is the averaged step size.

    Example:
        >>> import torch
        >>> _, eps = dual_averaging_update(dual_averaging_init(torch.tensor([0.1])), torch.tensor([1.0]), 0.8)
        >>> float(eps[0]) > 0.1   # accepted everything: grow the step
        True
    """
    t = state.t + 1
    eta = 1.0 / (t + t0)
    a = torch.nan_to_num(accept_stat, nan=0.0).clamp(0, 1)
    h_bar = (1 - eta) * state.h_bar + eta * (target - a)
    log_eps = state.mu - math.sqrt(t) / gamma * h_bar
    w = t ** (-kappa)
    log_eps_bar = w * log_eps + (1 - w) * state.log_eps_bar
    return DualAveragingState(state.mu, h_bar, log_eps_bar, t), log_eps.exp()


def warmup_windows(warmup: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25) -> list[int]:
    """Iterations (0-based, exclusive ends) at which Stan's slow mass-matrix windows close.

    A fast initial buffer adapts only the step size, then windows of 25, 50, 100, ... steps
    estimate the mass matrix (the last one stretched to the terminal buffer), then a final
    fast buffer re-adapts the step size. Short warm-ups use 15% / 75% / 10% as Stan does.

    Example:
        >>> warmup_windows(1000)
        [100, 150, 250, 450, 950]
        >>> warmup_windows(10)
        []
    """
    if warmup < 20:
        return []
    if init_buffer + base_window + term_buffer > warmup:
        init_buffer, term_buffer = int(0.15 * warmup), int(0.1 * warmup)
        base_window = warmup - init_buffer - term_buffer
    ends, start, size = [], init_buffer, base_window
    last = warmup - term_buffer
    while start < last:
        end = start + size
        if end + 2 * size > last:  # the next window would not fit: stretch this one
            end = last
        ends.append(end)
        start, size = end, 2 * size
    return ends


def first_window_start(warmup: int) -> int:
    """The iteration at which the first slow window of :func:`warmup_windows` opens."""
    if warmup < 20:
        return warmup
    return 75 if 75 + 25 + 50 <= warmup else int(0.15 * warmup)


def find_step_size(z, lp, g, inv_mass, fn: GradFn, gen, eps0: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Hoffman & Gelman's heuristic per chain: double or halve until a single leapfrog
    step's acceptance probability crosses 0.8 (as Stan's ``init_stepsize``)."""
    C = z.shape[0]
    eps = torch.as_tensor(eps0, dtype=z.dtype, device=z.device).expand(C).clone()
    direction = None
    active = z.new_ones(C, dtype=torch.bool)
    for _ in range(60):
        r = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device) / inv_mass.sqrt()
        H0 = -lp + kinetic(r, inv_mass)
        _, r1, _, lp1 = leapfrog(z, r, g, eps, inv_mass, fn)
        dH = -lp1 + kinetic(r1, inv_mass) - H0
        up = torch.nan_to_num(-dH, nan=-math.inf) > math.log(0.8)
        if direction is None:
            direction = up
        active = active & (up == direction)
        if not bool(active.any()):
            break
        eps = torch.where(active, torch.where(direction, eps * 2, eps / 2), eps)
    return eps.clamp(min=1e-8, max=1e3)


def regularised_variance(window: torch.Tensor) -> torch.Tensor:
    """Stan's shrunk variance estimate from a window ``[n, C, D]`` of draws."""
    n = window.shape[0]
    var = window.var(0) if n > 1 else torch.ones_like(window[0])
    return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


# ---------------------------------------------------------------------------- sampler
def _eager(fn: GradFn) -> GradFn:
    """The start, step-size search and adaptation call the gradient a few dozen times per window:
    never worth compiling a graph for."""
    return fn.eager if isinstance(fn, Target) else fn


class HMCState(NamedTuple):
    """Chains at ``z [C, D]`` with log density ``lp [C]``, gradient ``g [C, D]``, step sizes
    ``step_size [C]`` and diagonal inverse mass matrices ``inv_mass [C, D]``."""

    z: torch.Tensor
    lp: torch.Tensor
    g: torch.Tensor
    step_size: torch.Tensor
    inv_mass: torch.Tensor


def init(fn: GradFn, z0: torch.Tensor, gen: torch.Generator, step_size: float | None = None) -> HMCState:
    """The state at ``z0 [C, D]``: unit mass, the step size given or found by :func:`find_step_size`."""
    fn = _eager(fn)
    z = z0.clone()
    lp, g = fn(z)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError(
            "the log density is not finite at the initial values of some chains; "
            "check the model, its prior and the data (standardise x and y)"
        )
    inv_mass = torch.ones_like(z)
    if step_size is None:
        eps = find_step_size(z, lp, g, inv_mass, fn, gen)
    else:
        eps = z.new_full((z.shape[0],), float(step_size))
    return HMCState(z, lp, g, eps, inv_mass)


def step(
    state: HMCState,
    fn: GradFn,
    gen: torch.Generator,
    *,
    kernel: str = "nuts",
    max_tree_depth: int = 10,
    num_leapfrog_steps: int = 20,
) -> tuple[HMCState, dict[str, torch.Tensor]]:
    """One NUTS (``kernel="nuts"``) or static HMC transition for every chain; returns the new
    state and the per-chain statistics (with the ``step_size`` used and the new ``lp``).
    HMC jitters the step size by up to +-20% so fixed-length trajectories are not periodic."""
    z, lp, g, eps, inv_mass = state
    if kernel == "nuts":
        z, lp, g, info = nuts_step(z, lp, g, eps, inv_mass, fn, gen, max_tree_depth)
    else:
        jittered = eps * (1 + 0.2 * (2 * torch.rand(z.shape[0], generator=gen, dtype=z.dtype, device=z.device) - 1))
        z, lp, g, info = hmc_step(z, lp, g, jittered, inv_mass, fn, gen, num_leapfrog_steps)
    return HMCState(z, lp, g, eps, inv_mass), {**info, "step_size": eps, "lp": lp}


class WarmupState(NamedTuple):
    """Adaptation state: dual averaging, the slow windows' ends and the draws of the open window."""

    da: DualAveragingState
    window_ends: tuple[int, ...]
    first: int
    kept: tuple[torch.Tensor, ...]


def warmup_init(state: HMCState, warmup: int, adapt_mass_matrix: bool = True) -> WarmupState:
    ends = tuple(warmup_windows(warmup)) if adapt_mass_matrix else ()
    return WarmupState(dual_averaging_init(state.step_size), ends, first_window_start(warmup), ())


def adapt(
    state: HMCState,
    warm: WarmupState,
    info: dict,
    it: int,
    *,
    warmup: int,
    fn: GradFn,
    gen: torch.Generator,
    target_accept: float = 0.8,
    adapt_step_size: bool = True,
) -> tuple[HMCState, WarmupState]:
    """Warm-up iteration ``it``: step size by dual averaging towards ``target_accept``; the
    diagonal inverse mass matrix by the regularised variance of the draws in each of Stan's
    windows, after which the step size is re-initialised and dual averaging restarts; the
    averaged step size after the last warm-up iteration."""
    fn = _eager(fn)
    z, lp, g, eps, inv_mass = state
    da, ends, first, kept = warm
    if adapt_step_size:
        da, eps = dual_averaging_update(da, info["acceptance_rate"], target_accept)
    if ends and first <= it < ends[-1]:
        kept = kept + (z,)
    if it + 1 in ends:  # a slow window closes: new metric, fresh step-size search
        inv_mass = regularised_variance(torch.stack(kept))
        kept = ()
        lp, g = fn(z)
        if adapt_step_size:
            eps = find_step_size(z, lp, g, inv_mass, fn, gen, eps0=eps)
            da = dual_averaging_init(eps)
    if it == warmup - 1 and adapt_step_size:
        eps = da.log_eps_bar.exp()
    return HMCState(z, lp, g, eps, inv_mass), WarmupState(da, ends, first, kept)
