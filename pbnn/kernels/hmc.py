"""The gradient-based MCMC core shared by the NUTS, HMC and MH backends.

Everything here works on a *batch of chains* at once: positions are ``z [C, D]`` and the
target is a function ``log_density(z [C, D]) -> [C]`` (e.g.
:meth:`pbnn.potential.Potential.log_joint_batch`, which vmaps the model over chains). All
chains take their leapfrog steps in lockstep, so one vectorised gradient serves every
chain; a chain whose trajectory has already ended is masked out (its extra arithmetic is
cheap next to the per-step Python overhead it saves).

Pieces (each a small function on tensors):

* :func:`value_and_grad` turns a batched log density into ``z -> (logp [C], grad [C, D])``.
* :func:`nuts_step` is one No-U-Turn transition per chain (multinomial sampling inside
  subtrees, biased progressive sampling at the top, Stan's generalised U-turn criterion
  including the checks across merged subtrees, divergence at an energy error > 1000).
* :func:`hmc_step` is one static-length HMC transition per chain.
* :class:`DualAveraging` adapts a step size per chain (Hoffman & Gelman 2014).
* :func:`warmup_windows` is Stan's windowed warm-up schedule for the diagonal mass matrix.
* :func:`sample_chains` runs warm-up (step size, mass matrix) and sampling for either kernel.
* :func:`split_rhat`, :func:`ess_bulk` and :func:`convergence_warning` diagnose the result
  (rank-normalised split R-hat and bulk ESS as in Vehtari et al. 2021, via ``pyro.ops.stats``).

Example:
    >>> import torch
    >>> from pbnn.engine.mcmc import sample_chains, value_and_grad
    >>> target = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))   # standard normal in 2-D
    >>> out = sample_chains("nuts", target, torch.zeros(2, 2), num_samples=100, warmup=50,
    ...                     generator=torch.Generator().manual_seed(0), progress=False)
    >>> out.draws.shape, sorted(out.stats)[:3]
    (torch.Size([2, 100, 2]), ['acceptance_rate', 'diverging', 'lp'])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

__all__ = [
    "value_and_grad",
    "nuts_step",
    "hmc_step",
    "DualAveraging",
    "warmup_windows",
    "find_step_size",
    "sample_chains",
    "MCMCResult",
    "split_rhat",
    "ess_bulk",
    "convergence_warning",
]

GradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

MAX_ENERGY_ERROR = 1000.0  # Stan's divergence threshold on H(z, r) - H(z0, r0)


# ---------------------------------------------------------------------------- targets
class Target:
    """A batched log density and its gradient: ``target(z [C, D]) -> (logp [C], grad [C, D])``.

    Non-finite densities become ``-inf`` with a zero gradient, so a step into a region
    where the model overflows counts as a divergence instead of poisoning the chain.

    With ``compile=True`` the samplers ``torch.compile`` their inner step *together with*
    the gradient (built with ``torch.func.grad_and_value``): forward, backward and the
    leapfrog arithmetic become one fused graph, so a small BNN's leapfrog step costs tens of
    microseconds instead of a millisecond of eager-mode overhead, for about ten seconds
    of compilation. If compilation fails (e.g. no C++ compiler), pbnn warns once and runs
    eagerly.
    """

    def __init__(self, log_density: Callable[..., torch.Tensor], compile: bool = False, sanitise: bool = True) -> None:
        self.log_density = log_density
        self.compile = bool(compile)
        self.sanitise = sanitise
        self._cache: dict[str, Callable] = {}

    def raw(self, z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """Value and gradient (extra ``args`` go to the log density, e.g. a minibatch index),
        made finite unless ``sanitise=False`` (see the class docstring)."""
        if torch.compiler.is_compiling():  # torch.func traces into the compiled graph
            g, (_, lp) = torch.func.grad_and_value(lambda zz: _sum_with_aux(self.log_density(zz, *args)), has_aux=True)(
                z
            )
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

    def compiled(self, name: str, fn: Callable) -> Callable:
        """``fn`` compiled once per name when ``compile=True`` (eager otherwise or on failure)."""
        if not self.compile:
            return fn
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
        return self.compiled("value_and_grad", self.raw)(z.detach(), *args)


def _sum_with_aux(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lp.sum(), lp.detach()


def value_and_grad(log_density: Callable[[torch.Tensor], torch.Tensor], compile: bool = False) -> Target:
    """``z [C, D] -> (logp [C], grad [C, D])`` by one reverse pass over all chains (a :class:`Target`).

    Example:
        >>> import torch
        >>> lp, g = value_and_grad(lambda z: -0.5 * (z**2).sum(-1))(torch.ones(3, 2))
        >>> lp.tolist(), g[0].tolist()
        ([-1.0, -1.0, -1.0], [-1.0, -1.0])
    """
    return Target(log_density, compile)


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
def _checkpoint_tables(max_tree_depth: int, compiled: bool) -> list[tuple]:
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
            st, ch = torch.zeros(K, dtype=torch.bool), torch.zeros(K, dtype=torch.bool)
            if store is not None:
                st[store] = True
            ch[check] = True
            out.append((st, ch, torch.tensor(k == 0)))
        else:
            out.append((store, check, k == 0))
    return out


def _leaf_step(grad: GradFn, compiled: bool):
    """The work of one leaf of a NUTS subtree, as one function of tensors (so that
    ``torch.compile`` can fuse it with the gradient): a leapfrog step for the chains still
    running, progressive multinomial sampling of the subtree's proposal, the running
    momentum sum, U-turn checkpoints, and the divergence / U-turn stop.

    Compiled, the checkpoint bookkeeping uses masks over all ``K`` checkpoints (fixed shapes:
    one graph for every leaf); eagerly it indexes only the checkpoints this leaf touches.
    """

    def leaf(state: tuple, ck: tuple, u, leaf_index: int, v_eps, inv_mass, H0):
        z, r, g, lp, ps, zp, lpp, gp, log_w, rho, sum_acc, n, div, running, r_first, ps_first = state
        ck_r, ck_ps, ck_rho = ck
        e = v_eps[:, None]
        r1 = r + (0.5 * e) * g
        z1 = z + e * (inv_mass * r1)
        lp1, g1 = grad(z1)
        r1 = r1 + (0.5 * e) * g1
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
        state = (
            torch.where(m2, z1, z), torch.where(m2, r1, r), torch.where(m2, g1, g), torch.where(m, lp1, lp),
            torch.where(m2, ps1, ps), zp, lpp, gp, new_log_w, rho, sum_acc, n, div | diverged,
            m & ~diverged & ~turning, r_first, ps_first,
        )  # fmt: skip
        return state, (ck_r, ck_ps, ck_rho)

    return leaf


def _build_subtree(
    leaf, compiled: bool, start: dict, v_eps, depth: int, H0, active, inv_mass, gen, max_tree_depth: int
) -> dict:
    """A subtree of up to ``2**depth`` leapfrog steps from ``start``, built iteratively.

    Returns the far end (``z, r, g, lp, ps``), the first leaf's momentum (``r_first``,
    ``ps_first``), a proposal drawn multinomially (``zp, lpp, gp``), the log of its summed
    weights ``log_w``, the summed momenta ``rho``, ``stop`` (U-turn or divergence inside),
    ``div``, the summed acceptance statistic and the number of leapfrog steps (both counted
    for active chains only).
    """
    z = start["z"]
    C, D = z.shape
    K = max(max_tree_depth, 1)
    zeros = torch.zeros(C, D, dtype=z.dtype)
    state = (
        start["z"], start["r"], start["g"], start["lp"], start["ps"], start["z"], start["lp"], start["g"],
        torch.full((C,), -math.inf, dtype=z.dtype), zeros, torch.zeros(C, dtype=z.dtype),
        torch.zeros(C, dtype=torch.long), torch.zeros(C, dtype=torch.bool), active.clone(), zeros, zeros,
    )  # fmt: skip
    ck = tuple(torch.zeros(K, C, D, dtype=z.dtype) for _ in range(3))  # distinct: no aliasing guard
    tables = _checkpoint_tables(max_tree_depth, compiled)
    for k in range(2**depth):
        u = torch.rand(C, generator=gen, dtype=z.dtype)
        state, ck = leaf(state, ck, u, tables[k], v_eps, inv_mass, H0)
        if not bool(state[13].any()):  # every chain stopped (or was inactive)
            break
    out = dict(zip(_LEAF_STATE, state))
    out["stop"] = active & ~out.pop("running")
    return out


def nuts_step(z, lp, g, eps, inv_mass, fn: GradFn, gen, max_tree_depth: int = 10):
    """One NUTS transition for every chain.

    The trajectory doubles up to ``max_tree_depth`` times in a random direction; each new
    subtree is built iteratively, leaf by leaf, with U-turn checkpoints (Phan et al. 2019),
    so one leaf is one (compilable) function call; subtrees are merged by biased
    progressive sampling with Stan's generalised U-turn criterion, including its checks
    across the merged halves.

    Args:
        z, lp, g: current positions ``[C, D]``, log densities ``[C]`` and gradients ``[C, D]``.
        eps: step sizes ``[C]``; inv_mass: diagonal inverse mass matrices ``[C, D]``.
        fn: batched target (:func:`value_and_grad`); gen: torch.Generator.

    Returns:
        ``(z, lp, g, stats)`` with stats ``diverging``, ``acceptance_rate`` (mean Metropolis
        acceptance over the trajectory, the quantity dual averaging targets), ``tree_depth``
        and ``n_steps``, each ``[C]``.
    """
    C = z.shape[0]
    compiled = isinstance(fn, Target) and fn.compile
    leaf = fn.compiled("nuts_leaf", _leaf_step(fn.raw, True)) if compiled else _leaf_step(fn, False)
    r0 = torch.randn(z.shape, generator=gen, dtype=z.dtype) / inv_mass.sqrt()
    ps0 = inv_mass * r0
    H0 = 0.5 * torch.linalg.vecdot(r0, ps0) - lp
    left = {"z": z, "r": r0, "g": g, "lp": lp, "ps": ps0}
    right = dict(left)
    sample = {"zp": z, "lpp": lp, "gp": g}
    log_w = torch.zeros(C, dtype=z.dtype)
    rho = r0
    active = torch.isfinite(lp)
    depth = torch.zeros(C, dtype=torch.long)
    n = torch.zeros(C, dtype=torch.long)
    div = torch.zeros(C, dtype=torch.bool)
    sum_acc = torch.zeros(C, dtype=z.dtype)
    for j in range(max_tree_depth):
        forward = torch.rand(C, generator=gen) < 0.5
        v = forward.to(z.dtype) * 2 - 1
        start = _where(forward, right, left, _END)
        far_old = torch.where(forward[:, None], left["ps"], right["ps"])
        sub = _build_subtree(leaf, compiled, start, v * eps, j, H0, active, inv_mass, gen, max_tree_depth)
        ok = active & ~sub["stop"]
        # Biased progressive sampling (Betancourt 2017): favour the new subtree.
        accept = ok & (torch.rand(C, generator=gen, dtype=z.dtype) < torch.exp(sub["log_w"] - log_w))
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
    stats = {
        "diverging": div,
        "acceptance_rate": sum_acc / n.clamp(min=1),
        "tree_depth": depth,
        "n_steps": n,
    }
    return sample["zp"], sample["lpp"], sample["gp"], stats


# ---------------------------------------------------------------------------- HMC
def hmc_step(z, lp, g, eps, inv_mass, fn: GradFn, gen, num_steps: int = 20):
    """One static HMC transition (``num_steps`` leapfrog steps, Metropolis correction) per chain."""
    r0 = torch.randn(z.shape, generator=gen, dtype=z.dtype) / inv_mass.sqrt()
    H0 = -lp + kinetic(r0, inv_mass)
    zn, r, gn, lpn = z, r0, g, lp
    for _ in range(num_steps):
        zn, r, gn, lpn = leapfrog(zn, r, gn, eps, inv_mass, fn)
    dH = -lpn + kinetic(r, inv_mass) - H0
    dH = torch.where(torch.isnan(dH), torch.full_like(dH, math.inf), dH)
    acc = torch.exp(torch.clamp(-dH, max=0.0))
    accept = torch.rand(acc.shape, generator=gen, dtype=z.dtype) < acc
    z = torch.where(accept[:, None], zn, z)
    lp = torch.where(accept, lpn, lp)
    g = torch.where(accept[:, None], gn, g)
    C = z.shape[0]
    stats = {
        "diverging": dH > MAX_ENERGY_ERROR,
        "acceptance_rate": acc,
        "n_steps": torch.full((C,), num_steps, dtype=torch.long),
    }
    return z, lp, g, stats


# ---------------------------------------------------------------------------- adaptation
class DualAveraging:
    """Nesterov dual averaging of ``log(step size)`` per chain (Hoffman & Gelman 2014, Stan's constants).

    Example:
        >>> import torch
        >>> da = DualAveraging(torch.tensor([0.1]), target=0.8)
        >>> float(da.update(torch.tensor([1.0]))[0]) > 0.1   # accepted everything: grow the step
        True
    """

    def __init__(self, eps0: torch.Tensor, target: float, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75):
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.restart(eps0)

    def restart(self, eps0: torch.Tensor) -> None:
        self.mu = torch.log(10 * eps0)
        self.h_bar = torch.zeros_like(eps0)
        self.log_eps_bar = torch.zeros_like(eps0)
        self.t = 0

    def update(self, accept_stat: torch.Tensor) -> torch.Tensor:
        """Feed one iteration's mean acceptance statistic; return the next step sizes."""
        self.t += 1
        eta = 1.0 / (self.t + self.t0)
        a = torch.nan_to_num(accept_stat, nan=0.0).clamp(0, 1)
        self.h_bar = (1 - eta) * self.h_bar + eta * (self.target - a)
        log_eps = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        w = self.t ** (-self.kappa)
        self.log_eps_bar = w * log_eps + (1 - w) * self.log_eps_bar
        return log_eps.exp()

    @property
    def final(self) -> torch.Tensor:
        """The averaged step size used after warm-up."""
        return self.log_eps_bar.exp()


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


def find_step_size(z, lp, g, inv_mass, fn: GradFn, gen, eps0: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Hoffman & Gelman's heuristic per chain: double or halve until a single leapfrog
    step's acceptance probability crosses 0.8 (as Stan's ``init_stepsize``)."""
    C = z.shape[0]
    eps = torch.as_tensor(eps0, dtype=z.dtype).expand(C).clone()
    direction = None
    active = torch.ones(C, dtype=torch.bool)
    for _ in range(60):
        r = torch.randn(z.shape, generator=gen, dtype=z.dtype) / inv_mass.sqrt()
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


def _regularised_variance(window: torch.Tensor) -> torch.Tensor:
    """Stan's shrunk variance estimate from a window ``[n, C, D]`` of draws."""
    n = window.shape[0]
    var = window.var(0) if n > 1 else torch.ones_like(window[0])
    return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


# ---------------------------------------------------------------------------- driver
@dataclass
class MCMCResult:
    """What :func:`sample_chains` returns: ``draws [C, S, D]``, ``stats {name: [C, S]}``,
    the adapted ``step_size [C]`` and ``inv_mass [C, D]``."""

    draws: torch.Tensor
    stats: dict[str, torch.Tensor]
    step_size: torch.Tensor
    inv_mass: torch.Tensor


def sample_chains(
    kernel: str,
    fn: GradFn,
    z0: torch.Tensor,
    *,
    num_samples: int,
    warmup: int,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    num_steps: int = 20,
    step_size: float | None = None,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "NUTS",
) -> MCMCResult:
    """Warm up and sample ``C`` chains of ``kernel`` (``"nuts"`` or ``"hmc"``) from ``z0 [C, D]``.

    Warm-up: step size by dual averaging towards ``target_accept`` throughout; the diagonal
    inverse mass matrix by the regularised variance of the draws in each of Stan's windows
    (:func:`warmup_windows`), after which the step size is re-initialised and dual
    averaging restarts. Sampling uses the averaged step size.
    """
    C, D = z0.shape
    z = z0.clone()
    lp, g = fn(z)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError(
            "the log density is not finite at the initial values of some chains; "
            "check the model, its prior and the data (standardise x and y)"
        )
    inv_mass = torch.ones(C, D, dtype=z.dtype)
    if step_size is None:
        eps = find_step_size(z, lp, g, inv_mass, fn, generator)
    else:
        eps = torch.full((C,), float(step_size), dtype=z.dtype)
    da = DualAveraging(eps, target_accept)
    window_ends = warmup_windows(warmup) if adapt_mass_matrix else []
    kept_for_mass: list[torch.Tensor] = []

    def step(z, lp, g, eps):
        if kernel == "nuts":
            return nuts_step(z, lp, g, eps, inv_mass, fn, generator, max_tree_depth)
        # Jitter the step size by up to +-20% so fixed-length trajectories are not periodic.
        jittered = eps * (1 + 0.2 * (2 * torch.rand(C, generator=generator, dtype=z.dtype) - 1))
        return hmc_step(z, lp, g, jittered, inv_mass, fn, generator, num_steps)

    draws = torch.empty(C, num_samples, D, dtype=z.dtype)
    stats: dict[str, torch.Tensor] = {}
    div_count = torch.zeros(C, dtype=torch.long)
    bar = tqdm(range(warmup + num_samples), desc=desc, disable=not progress, leave=False)
    first_start = _first_window_start(warmup)
    for it in bar:
        z, lp, g, st = step(z, lp, g, eps)
        if it < warmup:
            if adapt_step_size:
                eps = da.update(st["acceptance_rate"])
            if window_ends and first_start <= it < window_ends[-1]:
                kept_for_mass.append(z)
            if it + 1 in window_ends:  # a slow window closes: new metric, fresh step-size search
                inv_mass = _regularised_variance(torch.stack(kept_for_mass))
                kept_for_mass = []
                lp, g = fn(z)
                if adapt_step_size:
                    eps = find_step_size(z, lp, g, inv_mass, fn, generator, eps0=eps)
                    da.restart(eps)
            if it == warmup - 1 and adapt_step_size:
                eps = da.final
        else:
            s = it - warmup
            draws[:, s] = z
            st = {**st, "step_size": eps, "lp": lp}
            for k, v in st.items():
                if k not in stats:
                    stats[k] = torch.empty((C, num_samples), dtype=v.dtype)
                stats[k][:, s] = v
            div_count += st["diverging"].to(torch.long)
        if progress and (it % 10 == 0 or it == warmup + num_samples - 1):
            bar.set_postfix(
                {
                    "phase": "warmup" if it < warmup else "sample",
                    "step": " ".join(f"{float(e):.2g}" for e in eps),
                    "div": " ".join(str(int(d)) for d in div_count),
                }
            )
    if warmup > 0 and adapt_step_size and num_samples == 0:
        eps = da.final
    return MCMCResult(draws=draws, stats=stats, step_size=eps, inv_mass=inv_mass)


def _first_window_start(warmup: int) -> int:
    if warmup < 20:
        return warmup
    return 75 if 75 + 25 + 50 <= warmup else int(0.15 * warmup)


# ---------------------------------------------------------------------------- diagnostics
def _split(x: torch.Tensor) -> torch.Tensor:
    """``[C, S, ...] -> [2C, S // 2, ...]``: each chain's halves as two chains."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, x.shape[1] - half :]], 0)


def _rank_normalise(x: torch.Tensor) -> torch.Tensor:
    """Normal scores of the pooled ranks (Vehtari et al. 2021), per trailing coordinate."""
    C, S = x.shape[:2]
    flat = x.reshape(C * S, -1).double()
    ranks = flat.argsort(0).argsort(0).double() + 1
    u = (ranks - 0.375) / (C * S + 0.25)
    return torch.distributions.Normal(0.0, 1.0).icdf(u).reshape(x.shape)


def split_rhat(x: torch.Tensor) -> torch.Tensor:
    """Rank-normalised split R-hat per coordinate of draws ``[C, S, D]`` (max of bulk and
    folded, as ArviZ's ``rhat``).

    Example:
        >>> import torch
        >>> float(split_rhat(torch.randn(4, 500, 1, generator=torch.Generator().manual_seed(0)))[0]) < 1.01
        True
    """
    from pyro.ops.stats import split_gelman_rubin

    bulk = split_gelman_rubin(_rank_normalise(x), chain_dim=0, sample_dim=1)
    folded = (x - x.median(1, keepdim=True).values.median(0, keepdim=True).values).abs()
    tail = split_gelman_rubin(_rank_normalise(folded), chain_dim=0, sample_dim=1)
    return torch.maximum(bulk, tail).to(x.dtype)


def ess_bulk(x: torch.Tensor) -> torch.Tensor:
    """Bulk effective sample size per coordinate of draws ``[C, S, D]`` (split chains,
    rank-normalised, Geyer's initial monotone sequence via ``pyro.ops.stats``).

    Example:
        >>> import torch
        >>> float(ess_bulk(torch.randn(2, 500, 1, generator=torch.Generator().manual_seed(0)))[0]) > 500
        True
    """
    from pyro.ops.stats import effective_sample_size

    return effective_sample_size(_rank_normalise(_split(x)), chain_dim=0, sample_dim=1).to(x.dtype)


def convergence_warning(
    draws: torch.Tensor, diverging: torch.Tensor | None, method: str, min_ess_per_chain: float = 100.0
) -> dict[str, float]:
    """Diagnose draws ``[C, S, D]``; emit one ``warnings.warn`` with the numbers when any
    R-hat > 1.01, the minimum bulk ESS < ``min_ess_per_chain`` per chain, or a transition
    diverged. Returns the numbers (``max_rhat``, ``min_ess_bulk``, ``divergences``).
    """
    C, S = draws.shape[:2]
    out = {"max_rhat": math.nan, "min_ess_bulk": math.nan, "divergences": 0.0}
    if diverging is not None:
        out["divergences"] = float(diverging.sum())
    problems = []
    if S >= 4:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rhat = split_rhat(draws)
            ess = ess_bulk(draws)
        out["max_rhat"] = float(torch.nan_to_num(rhat, nan=math.inf).max())
        out["min_ess_bulk"] = float(torch.nan_to_num(ess, nan=0.0).min())
        if out["max_rhat"] > 1.01:
            problems.append(f"max R-hat {out['max_rhat']:.3f} > 1.01")
        if out["min_ess_bulk"] < min_ess_per_chain * C:
            problems.append(f"min bulk ESS {out['min_ess_bulk']:.0f} < {min_ess_per_chain * C:.0f}")
    if out["divergences"] > 0:
        problems.append(f"{int(out['divergences'])} of {C * S} transitions diverged")
    if problems:
        warnings.warn(
            f"{method}: the chains may not have converged: {'; '.join(problems)}. "
            "Run longer (more warmup / num_samples) or more chains, raise target_accept for "
            "divergences, and inspect az.summary(post.to_arviz()). For BNN weights, hidden-unit "
            "permutations and separate modes inflate R-hat even when predictions agree: "
            "compare the chains' predictions too.",
            stacklevel=3,
        )
    return out


# ---------------------------------------------------------------------------- backend glue
INITS = ("net", "map")


def check_full_batch(batch_size, method: str) -> None:
    """MCMC here is exact only with the full likelihood: refuse a minibatch size."""
    if batch_size is not None:
        raise ValueError(
            f"{method} is full-batch: its Metropolis correction and Hamiltonian dynamics need the exact "
            "log-likelihood of all data, and a minibatch estimate would bias the chain without an error "
            "bound. Drop batch_size=, or use a stochastic-gradient sampler (method='sgld' or 'sghmc') "
            "for data too large for full-batch gradients."
        )


COMPILE_MIN_ITERATIONS = 500


def set_chain_options(
    backend, *, num_samples, warmup, num_chains, target_accept, init, init_jitter, map_steps, batch_size
) -> None:
    """Validate the options NUTS, HMC and MH share and set them on ``backend``."""
    from pbnn.infer.base import check_nonneg_int, check_positive_int

    backend.num_samples = check_positive_int("num_samples", num_samples)
    backend.warmup = check_nonneg_int("warmup", warmup)
    backend.num_chains = check_positive_int("num_chains", num_chains)
    if isinstance(target_accept, bool) or not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    backend.target_accept = float(target_accept)
    check_init(init)
    backend.init = init
    if isinstance(init_jitter, bool) or not isinstance(init_jitter, (int, float)) or init_jitter < 0:
        raise ValueError(f"init_jitter must be a non-negative number, got {init_jitter!r}")
    backend.init_jitter = float(init_jitter)
    backend.map_steps = check_positive_int("map_steps", map_steps)
    check_full_batch(batch_size, backend.name)


def check_compile(compile) -> bool | str:
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def should_compile(compile: bool | str, iterations: int, threshold: int = COMPILE_MIN_ITERATIONS) -> bool:
    """Resolve ``compile="auto"``: compile runs long enough to repay the compilation."""
    return iterations >= threshold if compile == "auto" else bool(compile)


def check_init(init) -> None:
    if not (isinstance(init, dict) or init in INITS):
        raise ValueError(f"init must be one of {INITS} or a dict of site values, got {init!r}")


def init_chains(
    potential,
    num_chains: int,
    init,
    *,
    jitter: float,
    map_steps: int,
    generator: torch.Generator,
    progress: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Starting points ``z0 [C, D]`` for a BNN's chains and the fixed deterministic parameters.

    ``init="net"``: the network's own initialisation (prior median for noise and hyper
    sites) plus ``N(0, jitter^2)`` noise per chain in the unconstrained space, so the chains
    differ. ``init="map"``: from there, ``map_steps`` of Adam on each chain's log joint (all
    chains at once), so warm-up starts near a mode. A dict gives site values to start from
    (plus jitter). Deterministic (non-Bayesian) parameters cannot be sampled: when the model
    has any, they are fitted by the same MAP warm start and then held fixed.
    """
    from pbnn.engine.training import run_adam

    model = potential.model
    base = potential.initial_z()
    if isinstance(init, dict):  # given sites override the default start
        unknown = set(init) - set(potential.names)
        if unknown:
            raise ValueError(f"init has unknown sites {sorted(unknown)}; the latent sites are {potential.names}")
        values, _ = potential.unpack(base)
        base = potential.pack({**values, **{k: torch.as_tensor(v, dtype=base.dtype) for k, v in init.items()}})
    z0 = base.expand(num_chains, -1) + jitter * torch.randn(num_chains, base.shape[-1], generator=generator)
    fixed = {n: p.detach().clone() for n, p in model.net.named_parameters() if n in model.deterministic_names}
    if init == "map" or fixed:
        z = z0.clone().requires_grad_(True)
        fixed = {k: v.requires_grad_(True) for k, v in fixed.items()}
        run_adam(
            [z, *fixed.values()],
            lambda idx: -potential.log_joint_batch(z, None, fixed).sum(),
            num_steps=map_steps,
            lr=0.01,
            n=len(potential.data) * num_chains,
            batch_size=None,
            desc="MAP warm start",
            progress=progress,
            loss_name="-log joint/N",
        )
        z0 = z.detach()
        fixed = {k: v.detach() for k, v in fixed.items()}
    return z0, fixed


def draws_to_sites(potential, draws: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unconstrained draws ``[C, S, D]`` -> constrained site values ``{site: [C, S, *shape]}``."""
    values, _ = potential.unpack(draws)
    return {k: v.detach() for k, v in values.items()}


def pyro_mcmc(make_kernel, model, data, *, num_samples: int, warmup: int, num_chains: int, progress: bool):
    """Run Pyro's ``MCMC`` for a hand-written Pyro model, one chain after another (a fresh
    kernel from ``make_kernel(model)`` per chain; no worker processes).

    Returns ``(samples {site: [C, S, ...]}, sample_stats)``; Pyro records only which
    transitions diverged, so ``diverging`` is the one per-draw statistic.
    """
    from pyro.infer import MCMC

    chains, diverging = [], torch.zeros(num_chains, num_samples, dtype=torch.bool)
    for c in range(num_chains):
        mcmc = MCMC(make_kernel(model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress)
        mcmc.run(data.x, data.y)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
        idx = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
        if len(idx):
            diverging[c, torch.as_tensor(idx, dtype=torch.long)] = True
    samples = {k: torch.stack([ch[k] for ch in chains]) for k in chains[0]}
    return samples, {"diverging": diverging}


def flatten_sites(samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{site: [C, S, *shape]}`` -> ``[C, S, D]`` for diagnostics."""
    return torch.cat([v.reshape(v.shape[:2] + (-1,)).to(torch.float64) for v in samples.values()], -1)
