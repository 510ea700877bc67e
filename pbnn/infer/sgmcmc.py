"""Stochastic-gradient MCMC backends (SGLD, SGHMC, pSGLD, cyclical SGLD / SGHMC) and their Pyro
``MCMCKernel`` adapters; see ``docs/sgmcmc.md``. ``lr`` is the learning rate on the per-datum
loss: the Langevin step is ``eps = 2 * lr / N``.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(100, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(100)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="sgld", num_samples=100, warmup=100, progress=False, seed=0)
    >>> post.samples["weight"].shape, post.sample_stats["step_size"].shape
    (torch.Size([1, 100, 1, 1]), torch.Size([1, 100]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from pbnn.core.data import validate
from pbnn.core.options import nonneg, nonneg_int, one_of, option, optional, positive, positive_int, probability
from pbnn.core.potential import Potential
from pbnn.engine import chains, distributed
from pbnn.engine.optim import resolve_batch_size
from pbnn.infer.base import Backend, ChainOptions, RunOptions, register
from pbnn.kernels import sgmcmc

# Former fixed threshold of compile="auto" (kept for reference); "auto" now decides from the
# measured step cost and compile time (pbnn.engine.chains.AutoCompile).
COMPILE_MIN_STEPS = 100_000


def friction_check(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def fraction_check(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} (the fraction beta of each cycle) must be in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class _SGMCMC(Backend, RunOptions, ChainOptions):
    """Options and the run shared by every SG-MCMC backend (see :class:`SGLD` for their meaning)."""

    renamed = {"step_size": "lr"}
    num_samples: int = option(1000, positive_int)
    warmup: int = option(1000, nonneg_int)
    num_chains: int = option(1, positive_int)
    thinning: int = option(10, positive_int)
    init: str = option("net", one_of("net", "map", "auto"))
    init_jitter: float = option(0.0, nonneg)
    map_steps: int = option(3000, positive_int)
    warn: bool = False
    lr: float = option(1e-2, positive)
    batch_size: int | None = option(None, optional(positive_int))
    temperature: float = option(1.0, nonneg)
    compile: bool | str = option("auto", one_of(True, False, "auto"))

    def _rule(self, num_data: int) -> sgmcmc.Rule:
        return sgmcmc.sgld(num_data, self.temperature)

    def _schedule(self) -> sgmcmc.Schedule:
        raise NotImplementedError

    def _warm_start(self, potential) -> bool:
        if self.init == "auto":  # see CyclicalSGLD: a BNN without a learned noise scale
            return potential.kind == "bnn" and not potential.model.noise_sites(potential.out_dim)
        return self.init == "map"

    def run(self, potential):
        potential.require(self.name, minibatch=resolve_batch_size(self.batch_size, len(potential.data)) is not None)
        warm_start = self._warm_start(potential)
        batch = resolve_batch_size(self.batch_size, len(potential.data))
        # "auto": start eagerly, compile the gradient once the measured costs say it pays.
        key = None if self.compile is False else (*chains.compile_key(potential), batch)
        rule, schedule = self._rule(len(potential.data)), self._schedule()

        def run(c: int, gen: torch.Generator):  # chain c; its randomness depends only on (seed, c)
            z = chains.chain_start(potential, c)
            if self.init_jitter > 0:
                z = z + self.init_jitter * torch.randn(z.shape, dtype=z.dtype, device=z.device)
            if warm_start:
                z = chains.warm_start(
                    potential, z, num_steps=self.map_steps, batch_size=self.batch_size, progress=self.progress
                )
            own = torch.Generator(z.device).manual_seed(int(torch.randint(0, 2**62, (), generator=gen).item()))
            grad = chains.sg_gradient(potential, self.batch_size, own, self.compile is True, self.name)
            return chains.sample_sgmcmc(
                grad,
                rule,
                schedule,
                z,
                num_samples=self.num_samples,
                warmup=self.warmup,
                generator=own,
                name=type(self).__name__,
                progress=self.progress,
                compile_key=key,
            )

        # Distributed: several chains are spread over the ranks; one chain runs on every rank
        # with data-parallel gradients and the same noise (see pbnn.distributed).
        result = distributed.map_chains(run, self.num_chains, chains.chain_generator())
        return self.chain_posterior(potential, result, potential.fixed, type(self).__name__, lr=self.lr)


@register("sgld")
@dataclass(frozen=True, kw_only=True)
class SGLD(_SGMCMC):
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011) on minibatches.

    ``theta <- theta - lr * grad L + sqrt(2 * lr * T / N) * xi`` where ``L`` is the
    minibatch estimate of the negative log posterior per data point (likelihood scaled by
    ``N / B``). Without a Metropolis correction the draws carry a discretisation bias of
    order ``lr``; the variance is inflated by roughly a factor ``1 / (1 - lr * lambda)`` in a
    direction of per-datum curvature ``lambda``.

    Args:
        num_chains: chains, run one after another; chain 0 starts at the network's own
            initialisation, later chains at a fresh ``reset_parameters()`` draw.
        lr: learning rate on the per-datum loss (formerly ``step_size``); the Langevin step
            is ``eps = 2 lr / N``, so it scales as ``1 / N`` with the data size (the usual
            choice in the SGLD literature). Default 1e-2, stable on standardised inputs and
            targets for small MLPs. The largest stable ``lr`` is about ``2 / lambda_max`` of
            the per-datum loss; it shrinks with the noise scale (``lambda ~ 1 / sigma^2``),
            and a plain SGLD chain that is near that limit keeps the learned noise scale
            too large: use :class:`PSGLD` when the data are nearly noise-free.
        batch_size: minibatch size; None: full batch up to 2048 points, else 256.
        thinning: gradient steps per kept draw (and per warm-up transition).
        temperature: T multiplies the noise variance; T = 1 is the Bayes posterior, T < 1
            a cold posterior (never the default).
        compile: ``torch.compile`` the minibatch gradient (:class:`pbnn.kernels.hmc.Target`; a Pyro
            model's trace is first recorded as a graph): ``True``, ``False`` or ``"auto"`` (start
            eagerly, compile once the measured step cost says the rest of the chain repays the
            compilation: :class:`pbnn.engine.chains.AutoCompile`).
        schedule: ``"constant"`` or ``"polynomial"``: ``a (b + t)^-gamma`` with
            ``b = decay_b``, ``gamma = decay_gamma`` and ``a`` such that step 0 has ``lr``.
        init: ``"net"`` (default, see ``num_chains``) or ``"map"``: first ``map_steps`` (3000) of
            Adam on the same target and minibatches (:func:`pbnn.engine.chains.warm_start`: a
            BNN's weights only); ``"auto"``: ``"map"`` for a BNN without a learned noise scale.
        others: as in ``ChainOptions`` and ``RunOptions`` (``init_jitter`` default 0, ``warn``
            default False).

    The Posterior's ``sample_stats["step_size"]`` holds the learning rate of the step
    that produced each draw; there is no acceptance rate (SG-MCMC has no accept step).

    Example:
        >>> import pbnn
        >>> pbnn.infer.SGLD(lr=1e-4, thinning=5).lr
        0.0001
    """

    schedule: str = option("constant", one_of("constant", "polynomial"))
    decay_b: float = option(1000.0, positive)
    decay_gamma: float = option(0.55, positive)

    def validate(self) -> None:
        super().validate()
        if self.schedule == "polynomial" and not 0.5 < self.decay_gamma <= 1:
            raise ValueError("the polynomial schedule needs decay_gamma in (0.5, 1] and decay_b > 0")

    def _schedule(self) -> sgmcmc.Schedule:
        if self.schedule == "polynomial":
            return sgmcmc.polynomial_schedule(self.lr, self.decay_b, self.decay_gamma, self.thinning)
        return sgmcmc.constant_schedule(self.lr, self.thinning)


@register("sghmc")
@dataclass(frozen=True, kw_only=True)
class SGHMC(SGLD):
    """Stochastic-gradient HMC (Chen, Fox & Guestrin 2014), in the cSGHMC form:
    ``m <- (1 - a) m - lr * grad L + sqrt(2 * lr * a * T / N) * xi``, ``theta <- theta + m``.

    Args:
        friction: ``a`` in (0, 1]: the momentum decays by ``1 - a`` per step; ``a = 1`` is
            SGLD. Default 0.1 (momentum 0.9, Chen et al.'s range).
        lr: default 1e-3 (SGHMC moves about ``1 / a`` times as far per step as SGLD at
            the same ``lr``, so the default is SGLD's times ``a``).
        others: as :class:`SGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SGHMC(friction=0.2).friction
        0.2
    """

    lr: float = option(1e-3, positive)
    friction: float = option(0.1, friction_check)

    def _rule(self, num_data: int) -> sgmcmc.Rule:
        return sgmcmc.sghmc(num_data, self.friction, self.temperature)


@register("psgld")
@dataclass(frozen=True, kw_only=True)
class PSGLD(SGLD):
    """Preconditioned SGLD (Li, Chen, Carlson & Carin 2016): RMSprop's diagonal
    preconditioner ``G = 1 / (eps + sqrt(V))`` scales drift and noise per weight.

    Args:
        lr: the RMSprop learning rate; default 1e-3 (RMSprop's usual value).
        alpha, eps: RMSprop's averaging constant (0.99) and ``lambda`` (1e-5).
        others: as :class:`SGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.PSGLD().alpha
        0.99
    """

    lr: float = option(1e-3, positive)
    alpha: float = option(0.99, probability)
    eps: float = option(1e-5, positive)

    def _rule(self, num_data: int) -> sgmcmc.Rule:
        return sgmcmc.psgld(num_data, self.temperature, self.alpha, self.eps)


def cycle_length_for(draws_per_cycle: int, thinning: int, exploration: float) -> int:
    """Shortest cycle whose sampling stage (the last ``1 - exploration`` of it) holds
    ``draws_per_cycle`` draws ``thinning`` steps apart.

    Example:
        >>> cycle_length_for(100, 10, 0.5)
        1982
    """
    length = max(1, math.ceil((draws_per_cycle - 1) * thinning / (1.0 - exploration)))
    while True:
        samples = (j == length or not sgmcmc.is_exploration(j + 1, length, 1, exploration) for j in range(length + 1))
        first = next(j for j, s in enumerate(samples) if s)
        if first < length and (length - 1 - first) // thinning + 1 >= draws_per_cycle:
            return length
        length += 1


@dataclass(frozen=True, kw_only=True)
class _Cyclical(_SGMCMC):
    warmup: int = option(0, nonneg_int)
    init: str = option("auto", one_of("net", "map", "auto"))
    num_cycles: int = option(4, positive_int)
    exploration: float = option(0.5, fraction_check)
    cycle_length: int | None = option(None, optional(positive_int))

    def validate(self) -> None:
        super().validate()
        if self.num_samples + self.warmup < self.num_cycles:
            raise ValueError(f"num_samples + warmup must be >= num_cycles ({self.num_cycles}) to keep a draw per cycle")

    def _schedule(self) -> sgmcmc.Schedule:
        draws_per_cycle = math.ceil((self.warmup + self.num_samples) / self.num_cycles)
        length = self.cycle_length or cycle_length_for(draws_per_cycle, self.thinning, self.exploration)
        return sgmcmc.cyclical_schedule(self.lr, length, self.num_cycles, self.exploration, self.thinning)


@register("csgld")
@dataclass(frozen=True, kw_only=True)
class CyclicalSGLD(_Cyclical):
    """Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020): a cosine learning rate
    restarted ``num_cycles`` times; each cycle first explores (plain gradient steps, no
    noise, no draws) and then samples (SGLD noise on, draws kept), so one chain can visit
    several modes.

    The cycle length is chosen so that each cycle's sampling stage holds
    ``ceil((warmup + num_samples) / num_cycles)`` draws ``thinning`` steps apart, the last
    draw at the cycle's last step; ``alpha_k = alpha_0 / 2 (cos(pi mod(k - 1, L) / L) + 1)``.

    Args:
        num_cycles: M, the number of cycles (default 4).
        exploration: beta, the noise-free fraction of each cycle (default 0.5).
        lr: ``alpha_0``, the learning rate at each cycle's start; default 5e-3. Each
            cycle restarts at ``alpha_0`` wherever the last one ended (possibly a sharp, low-noise
            region), so it must be stable there: on the gap demo data 1e-2 and 2e-2 diverged at
            a cycle restart.
        warmup: transitions discarded (default 0: each exploration stage is the burn-in).
        init: default ``"auto"``: a MAP warm start of the weights (``map_steps`` Adam steps,
            :func:`pbnn.engine.chains.warm_start`) before the first cycle for a BNN without a
            learned noise scale (classification, fixed-noise regression); otherwise the
            network's initialisation (``"net"``; a Pyro model: its prior median). From the
            initialisation the noise-free exploration stages, SGD at an average rate
            ``alpha_0 / 2``, under-train a classifier in the default budget (digits:
            single-draw train accuracy 0.94 in cycle 0; moons accuracy 0.88 against 0.96
            warm-started). With a learned noise scale the warm start hurts: the exploration
            stages then pull the scale down onto the training residuals of the trained net
            (Friedman, seed 0: test NLL 1.17 warm-started against 0.36 from scratch).
        cycle_length: gradient steps per cycle; None (default): the shortest cycle whose
            sampling stage holds ``ceil((warmup + num_samples) / num_cycles)`` draws.
        others: as :class:`SGLD` (no ``schedule``).

    ``sample_stats["cycle"]`` holds each draw's cycle (0-based) and
    ``sample_stats["step_size"]`` its learning rate. Draws of one cycle are correlated;
    draws of different cycles come from (possibly) different modes.

    Example:
        >>> import pbnn
        >>> pbnn.infer.CyclicalSGLD(num_cycles=5, exploration=0.8).num_cycles
        5
    """

    lr: float = option(5e-3, positive)


@register("csghmc")
@dataclass(frozen=True, kw_only=True)
class CyclicalSGHMC(_Cyclical):
    """Cyclical SGHMC (Zhang et al. 2020): :class:`CyclicalSGLD`'s schedule with SGHMC's
    momentum update; in the exploration stage it is SGD with momentum ``1 - friction``.

    Args:
        friction: ``a`` (default 0.9, the reference code's value; ``a = 1`` is cSGLD).
        lr: ``alpha_0``; default 2e-3 (5e-3 diverged at a cycle restart on the gap demo data).
        others: as :class:`CyclicalSGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.CyclicalSGHMC().friction
        0.9
    """

    lr: float = option(2e-3, positive)
    friction: float = option(0.9, friction_check)

    def _rule(self, num_data: int) -> sgmcmc.Rule:
        return sgmcmc.sghmc(num_data, self.friction, self.temperature)


# ---------------------------------------------------------------------------- Pyro MCMCKernel adapters
class SGMCMCKernel(MCMCKernel):
    """A backend's sampler as a Pyro ``MCMCKernel`` for ``pyro.infer.MCMC``: a thin adapter over
    the backend's options and :func:`pbnn.kernels.sgmcmc.transition`. It owns its data
    (``MCMC.run(x, y)``) and minibatches; one ``sample`` call is one transition, and ``stats``
    holds each kept draw's learning rate (and cycle).

    Args:
        model: a :class:`pbnn.BNN` or a Pyro model ``model(x, y=None, subsample=None)``.
        lr: learning rate on the per-datum loss (formerly ``step_size``).
        options: the backend's options (``thinning`` and ``compile`` default 1 and False here;
            ``seed`` seeds the kernel's own generator).

    Example:
        >>> import torch, pyro, pbnn
        >>> x = torch.randn(100, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(100)
        >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
        >>> kernel = SGLDKernel(model, lr=1e-3, seed=0)
        >>> mcmc = pyro.infer.MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
        >>> mcmc.run(x, y)
        >>> round(float(mcmc.get_samples()["weight"].mean()), 1), kernel.thinning
        (2.0, 1)
    """

    backend: type[_SGMCMC] = SGLD

    def __init__(self, model, lr: float | None = None, **options) -> None:
        self.model = model
        given = {} if lr is None else {"lr": lr}
        self.options = self.backend(**{"thinning": 1, "compile": False, **options, **given})
        self.method = self.options.name
        self.transforms = self.potential = self._generator = self._init = None

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("options", "model"):
            raise AttributeError(name)
        return getattr(self.options, name)

    def _schedule(self, step: int) -> float:
        """The learning rate of gradient step ``step`` (1-based)."""
        return self.options._schedule().lr(step)

    def setup(self, warmup_steps: int, x=None, y=None, *args, **kwargs) -> None:
        """Take the data (``MCMC.run(x, y)``), build the potential and gradient, reset the chain state."""
        if x is None or y is None or args or kwargs:
            raise ValueError("SG-MCMC kernels own their data and take exactly MCMC(...).run(x, y)")
        self.potential = Potential(self.model, validate(self.model, x, y))
        # Pyro's MCMC wants constrained -> unconstrained transforms (it applies .inv to the draws).
        self.transforms = {n: t.inv for n, t in zip(self.potential.names, self.potential.transforms)}
        if self._generator is None:  # kept across chains, so sequential chains differ
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._generator = torch.Generator(self.potential.initial_z().device).manual_seed(seed)
        compile = self.compile is True  # "auto" has no run length to go by here: eager
        self._grad = chains.sg_gradient(self.potential, self.batch_size, self._generator, compile, self.method)
        self._rule, self._sched = self.options._rule(len(self.potential.data)), self.options._schedule()
        start = self.potential.initial_z() if self._init is None else self.potential.layout.join(self._init)
        self._state = sgmcmc.init(self._rule, start.detach().clone(), self.lr)
        self.warmup_steps, self._transitions, self._last = warmup_steps, 0, None
        self.stats: dict[str, list] = {"step_size": []}

    _z = property(lambda self: self._state.z)
    _step = property(lambda self: self._state.step)

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        """Unconstrained initial values ``{site: tensor}`` (the network's own init for a BNN)."""
        if self.potential is None:
            raise RuntimeError("call setup (MCMC.run) first")
        return self.potential.layout.split(self._state.z)

    @initial_params.setter
    def initial_params(self, params: dict[str, torch.Tensor]) -> None:
        self._init = params
        if self.potential is not None:
            self._state = self._state._replace(z=self.potential.layout.join(params).detach())

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One transition: gradient steps up to the next collection point; returns unconstrained params."""
        z = self._state.z if params is self._last else self.potential.layout.join(params).detach()
        state = self._state._replace(z=z)
        self._state, info = sgmcmc.transition(
            state, self._grad, self._rule, self._sched, self._generator, type(self).__name__
        )
        self._transitions += 1
        if self._transitions > self.warmup_steps:
            self.stats["step_size"].append(self._state.lr)
            if "cycle" in info:
                self.stats.setdefault("cycle", []).append(int(info["cycle"]))
        self._last = self.potential.layout.split(self._state.z)
        return self._last

    def logging(self) -> dict:
        return {"step size": f"{self._state.lr:.2e}", "grad steps": self._state.step}

    def diagnostics(self) -> dict:
        """Per-chain diagnostics for ``MCMC.diagnostics()``. ``divergences`` (the kept draws that
        diverged, as Pyro's HMC reports them; none here: SG-MCMC has no accept / reject step)
        is what ``az.from_pyro(mcmc)`` reads."""
        return {"divergences": [], "gradient_steps": self._state.step}


class SGLDKernel(SGMCMCKernel):
    """:class:`SGLD` as a Pyro ``MCMCKernel`` (see :class:`SGMCMCKernel`)."""


class SGHMCKernel(SGMCMCKernel):
    """:class:`SGHMC` as a Pyro ``MCMCKernel``.

    Example:
        >>> import torch, pbnn
        >>> SGHMCKernel(pbnn.BNN(torch.nn.Linear(1, 1)), lr=1e-3, friction=0.1).friction
        0.1
    """

    backend = SGHMC


class PSGLDKernel(SGMCMCKernel):
    """:class:`PSGLD` as a Pyro ``MCMCKernel``."""

    backend = PSGLD


class CyclicalSGLDKernel(SGMCMCKernel):
    """:class:`CyclicalSGLD` as a Pyro ``MCMCKernel``; pass ``cycle_length`` (gradient steps
    per cycle) and ``num_cycles`` (the schedule keeps cycling if the run is longer).

    Example:
        >>> import torch, pbnn
        >>> k = CyclicalSGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), 0.1, cycle_length=100, num_cycles=4)
        >>> k.cycle_length * k.num_cycles
        400
    """

    backend = CyclicalSGLD

    def logging(self):
        return {**super().logging(), "cycle": self._sched.cycle(max(self._step, 1))}


class CyclicalSGHMCKernel(CyclicalSGLDKernel):
    """:class:`CyclicalSGHMC` as a Pyro ``MCMCKernel`` (``friction`` default 0.9)."""

    backend = CyclicalSGHMC
