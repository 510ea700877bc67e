"""Stochastic-gradient MCMC backends: SGLD, SGHMC, pSGLD and cyclical SGLD / SGHMC.

Each backend runs one of the Pyro ``MCMCKernel`` drivers of :mod:`pbnn.engine.sgmcmc` under
``pyro.infer.MCMC`` (one run per chain) and collects the draws into a Posterior. The
update rules and schedules live in :mod:`pbnn.engine.sgmcmc`; see ``docs/sgmcmc.md``.

Step size convention: ``step_size`` is the learning rate on the mean loss per data point
(the form of the cyclical SG-MCMC reference code), so the Langevin step of Welling & Teh
is ``eps = 2 * step_size / N``: it shrinks as ``1 / N`` as the posterior narrows, and one
default serves data sets of any size once the inputs and targets are standardised.

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

import pyro
import torch

from pbnn.engine import distributed, mcmc
from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_nonneg_int, check_positive, check_positive_int, register
from pbnn.core.model import BNN
from pbnn.posterior.posterior import Posterior
from pbnn.engine.sgmcmc import (
    CyclicalSGHMCKernel,
    CyclicalSGLDKernel,
    PSGLDKernel,
    SGHMCKernel,
    SGLDKernel,
    chain_initial_params,
    is_exploration,
    map_warm_start,
)
from pbnn.engine.training import seeded

__all__ = ["SGLD", "SGHMC", "PSGLD", "CyclicalSGLD", "CyclicalSGHMC"]


# "auto" compiles the gradient for runs of at least this many gradient steps: ~10 s of
# compilation against a few hundred microseconds saved per step.
COMPILE_MIN_STEPS = 100_000


class _SGMCMC(Backend):
    """Options shared by every SG-MCMC backend (see :class:`SGLD` for their meaning)."""

    default_step_size = 1e-2
    default_init = "net"

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 1000,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        *,
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.warmup = check_nonneg_int("warmup", warmup)
        self.num_chains = check_positive_int("num_chains", num_chains)
        self.step_size = self.default_step_size if step_size is None else check_positive("step_size", step_size)
        self.batch_size = batch_size
        self.thinning = check_positive_int("thinning", thinning)
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.seed = seed
        self.progress = progress
        self.compile = mcmc.check_compile(compile)
        self.init = self.default_init if init is None else init
        if self.init not in ("net", "map", "auto"):
            raise ValueError(f"init must be 'net', 'map' or 'auto', got {init!r}")
        self.map_steps = check_positive_int("map_steps", map_steps)

    def _warm_start(self, model, data: Data) -> bool:
        if self.init == "auto":  # see CyclicalSGLD: a BNN without a learned noise scale
            return isinstance(model, BNN) and not model.noise_sites(model.output_dim(data.x))
        return self.init == "map"

    def _kernel(self, model, seed: int):
        raise NotImplementedError

    def _common(self, seed: int) -> dict:
        return {
            "batch_size": self.batch_size,
            "thinning": self.thinning,
            "temperature": self.temperature,
            "seed": seed,
            "compile": mcmc.should_compile(
                self.compile, (self.num_samples + self.warmup) * self.thinning * self.num_chains, COMPILE_MIN_STEPS
            ),
        }

    def fit(self, model, data: Data) -> Posterior:
        warm_start = self._warm_start(model, data)

        def run(c: int, gen: torch.Generator):  # chain c; its randomness depends only on (seed, c)
            with pyro.get_param_store().scope():
                init = chain_initial_params(model, data, c)
                if warm_start:
                    init = map_warm_start(
                        model, data, init, num_steps=self.map_steps, batch_size=self.batch_size, progress=self.progress
                    )
                kernel = self._kernel(model, int(torch.randint(0, 2**62, (), generator=gen).item()))
                mcmc = pyro.infer.MCMC(
                    kernel,
                    num_samples=self.num_samples,
                    warmup_steps=self.warmup,
                    initial_params=init,
                    disable_progbar=not self.progress,
                )
                mcmc.run(data.x, data.y)
            stats = {k: torch.tensor(v)[None] for k, v in kernel.stats.items()}
            return mcmc.get_samples(group_by_chain=True), stats, [kernel._step], [(kernel._source.fixed, type(kernel))]

        # Distributed: several chains are spread over the ranks; one chain runs on every rank
        # with data-parallel gradients and the same noise (see pbnn.distributed).
        with seeded(distributed.broadcast_seed(self.seed)):
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            samples, sample_stats, steps, last = distributed.map_chains(run, self.num_chains, gen)
        fixed, kernel_class = last[-1]
        return Posterior(
            model,
            samples,
            data=data,
            method=self.name,
            sample_stats=sample_stats,
            fixed=fixed,
            info={"gradient_steps": steps, "step_size": self.step_size, "kernel": kernel_class.__name__},
        )


@register("sgld")
class SGLD(_SGMCMC):
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011) on minibatches.

    ``theta <- theta - lr * grad L + sqrt(2 * lr * T / N) * xi`` where ``L`` is the
    minibatch estimate of the negative log posterior per data point (likelihood scaled by
    ``N / B``). Without a Metropolis correction the draws carry a discretisation bias of
    order ``lr``; the variance is inflated by roughly a factor ``1 / (1 - lr * lambda)`` in a
    direction of per-datum curvature ``lambda``.

    Args:
        num_samples: draws kept per chain.
        warmup: transitions discarded at the start of each chain (burn-in).
        num_chains: chains, run one after another; chain 0 starts at the network's own
            initialisation, later chains at a fresh ``reset_parameters()`` draw.
        step_size: learning rate ``lr`` on the per-datum loss; the Langevin step is
            ``eps = 2 lr / N``, so it scales as ``1 / N`` with the data size (the usual
            choice in the SGLD literature). None: 1e-2, stable on standardised inputs and
            targets for small MLPs. The largest stable ``lr`` is about ``2 / lambda_max`` of
            the per-datum loss; it shrinks with the noise scale (``lambda ~ 1 / sigma^2``),
            and a plain SGLD chain that is near that limit keeps the learned noise scale
            too large: use :class:`PSGLD` when the data are nearly noise-free.
        batch_size: minibatch size; None: full batch up to 2048 points, else 256.
        thinning: gradient steps per kept draw (and per warm-up transition).
        temperature: T multiplies the noise variance; T = 1 is the Bayes posterior, T < 1
            a cold posterior (never the default).
        compile: ``torch.compile`` the minibatch gradient (:class:`pbnn.engine.mcmc.Target`): ``True``,
            ``False`` or ``"auto"`` (runs of at least ``COMPILE_MIN_STEPS`` = 100,000 gradient
            steps over all chains, where the ~10 s of compilation pays off).
        schedule: ``"constant"`` or ``"polynomial"``: ``a (b + t)^-gamma`` with
            ``b = decay_b``, ``gamma = decay_gamma`` and ``a`` such that step 0 has ``step_size``.
        seed: seed for the kernel's noise, minibatches and chain starts.
        progress: show Pyro's progress bar.
        init: ``"net"`` (default: each chain starts at its own initialisation, see
            ``num_chains``) or ``"map"``: from there, ``map_steps`` of Adam on the same target
            and minibatches first (:func:`pbnn.engine.sgmcmc.map_warm_start`: a BNN's weights only,
            its noise scale stays at the prior median), so the chain starts near a mode and
            burn-in is short; ``"auto"``: ``"map"`` for a BNN without a learned noise scale
            (classification, fixed-noise regression), ``"net"`` otherwise.
        map_steps: Adam steps of the ``init="map"`` warm start (default 3000, as ``method="map"``).

    The Posterior's ``sample_stats["step_size"]`` holds the learning rate of the step
    that produced each draw; there is no acceptance rate (SG-MCMC has no accept step).

    Example:
        >>> import pbnn
        >>> pbnn.infer.SGLD(step_size=1e-4, thinning=5).step_size
        0.0001
    """

    name = "sgld"
    kernel_class = SGLDKernel

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 1000,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        schedule: str = "constant",
        decay_b: float = 1000.0,
        decay_gamma: float = 0.55,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        super().__init__(
            num_samples, warmup, num_chains, step_size, batch_size, thinning, temperature, seed, progress, compile,
            init=init, map_steps=map_steps,
        )  # fmt: skip
        if schedule not in ("constant", "polynomial"):
            raise ValueError(f"schedule must be 'constant' or 'polynomial', got {schedule!r}")
        self.schedule, self.decay_b, self.decay_gamma = schedule, decay_b, decay_gamma

    def _common(self, seed):
        return {
            **super()._common(seed),
            "schedule": self.schedule,
            "decay_b": self.decay_b,
            "decay_gamma": self.decay_gamma,
        }

    def _kernel(self, model, seed):
        return self.kernel_class(model, self.step_size, **self._common(seed))


@register("sghmc")
class SGHMC(SGLD):
    """Stochastic-gradient HMC (Chen, Fox & Guestrin 2014), in the cSGHMC form:
    ``m <- (1 - a) m - lr * grad L + sqrt(2 * lr * a * T / N) * xi``, ``theta <- theta + m``.

    Args:
        friction: ``a`` in (0, 1]: the momentum decays by ``1 - a`` per step; ``a = 1`` is
            SGLD. Default 0.1 (momentum 0.9, Chen et al.'s range).
        step_size: None: 1e-3 (SGHMC moves about ``1 / a`` times as far per step as SGLD at
            the same ``lr``, so the default is SGLD's times ``a``).
        others: as :class:`SGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.SGHMC(friction=0.2).friction
        0.2
    """

    name = "sghmc"
    kernel_class = SGHMCKernel
    default_step_size = 1e-3

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 1000,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        schedule: str = "constant",
        decay_b: float = 1000.0,
        decay_gamma: float = 0.55,
        friction: float = 0.1,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        super().__init__(
            num_samples, warmup, num_chains, step_size, batch_size, thinning, temperature, schedule, decay_b,
            decay_gamma, seed, progress, compile, init, map_steps,
        )  # fmt: skip
        if not isinstance(friction, (int, float)) or not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        self.friction = float(friction)

    def _kernel(self, model, seed):
        return SGHMCKernel(model, self.step_size, friction=self.friction, **self._common(seed))


@register("psgld")
class PSGLD(SGLD):
    """Preconditioned SGLD (Li, Chen, Carlson & Carin 2016): RMSprop's diagonal
    preconditioner ``G = 1 / (eps + sqrt(V))`` scales drift and noise per weight.

    Args:
        step_size: the RMSprop learning rate. None: 1e-3 (RMSprop's usual value).
        alpha, eps: RMSprop's averaging constant (0.99) and ``lambda`` (1e-5).
        others: as :class:`SGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.PSGLD().alpha
        0.99
    """

    name = "psgld"
    kernel_class = PSGLDKernel
    default_step_size = 1e-3

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 1000,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        schedule: str = "constant",
        decay_b: float = 1000.0,
        decay_gamma: float = 0.55,
        alpha: float = 0.99,
        eps: float = 1e-5,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        super().__init__(
            num_samples, warmup, num_chains, step_size, batch_size, thinning, temperature, schedule, decay_b,
            decay_gamma, seed, progress, compile, init, map_steps,
        )  # fmt: skip
        if not 0 < alpha < 1 or not eps > 0:
            raise ValueError(f"pSGLD needs 0 < alpha < 1 and eps > 0, got alpha={alpha!r}, eps={eps!r}")
        self.alpha, self.eps = float(alpha), float(eps)

    def _kernel(self, model, seed):
        return PSGLDKernel(model, self.step_size, alpha=self.alpha, eps=self.eps, **self._common(seed))


def cycle_length_for(draws_per_cycle: int, thinning: int, exploration: float) -> int:
    """Shortest cycle whose sampling stage (the last ``1 - exploration`` of it) holds
    ``draws_per_cycle`` draws ``thinning`` steps apart.

    Example:
        >>> cycle_length_for(100, 10, 0.5)
        1982
    """
    length = max(1, math.ceil((draws_per_cycle - 1) * thinning / (1.0 - exploration)))
    while True:
        first = next(j for j in range(length + 1) if j == length or not is_exploration(j + 1, length, 1, exploration))
        if first < length and (length - 1 - first) // thinning + 1 >= draws_per_cycle:
            return length
        length += 1


class _CyclicalMixin:
    def _cyclical_kwargs(self) -> dict:
        draws_per_cycle = math.ceil((self.warmup + self.num_samples) / self.num_cycles)
        return {
            "cycle_length": cycle_length_for(draws_per_cycle, self.thinning, self.exploration),
            "num_cycles": self.num_cycles,
            "exploration": self.exploration,
        }

    def _cyclical_init(self, num_cycles, exploration):
        self.num_cycles = check_positive_int("num_cycles", num_cycles)
        if not isinstance(exploration, (int, float)) or not 0 <= exploration < 1:
            raise ValueError(f"exploration (the fraction beta of each cycle) must be in [0, 1), got {exploration!r}")
        self.exploration = float(exploration)
        if self.num_samples + self.warmup < self.num_cycles:
            raise ValueError(f"num_samples + warmup must be >= num_cycles ({self.num_cycles}) to keep a draw per cycle")


@register("csgld")
class CyclicalSGLD(_CyclicalMixin, _SGMCMC):
    """Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020): a cosine step size
    restarted ``num_cycles`` times; each cycle first explores (plain gradient steps, no
    noise, no draws) and then samples (SGLD noise on, draws kept), so one chain can visit
    several modes.

    The cycle length is chosen so that each cycle's sampling stage holds
    ``ceil((warmup + num_samples) / num_cycles)`` draws ``thinning`` steps apart, the last
    draw at the cycle's last step; ``alpha_k = alpha_0 / 2 (cos(pi mod(k - 1, L) / L) + 1)``.

    Args:
        num_cycles: M, the number of cycles (default 4).
        exploration: beta, the noise-free fraction of each cycle (default 0.5).
        step_size: ``alpha_0``, the learning rate at each cycle's start; None: 5e-3. Each
            cycle restarts at ``alpha_0`` wherever the last one ended (possibly a sharp, low-noise
            region), so it must be stable there: on the gap demo data 1e-2 and 2e-2 diverged at
            a cycle restart.
        warmup: transitions discarded (default 0: each exploration stage is the burn-in).
        init: default ``"auto"``: a MAP warm start of the weights (``map_steps`` Adam steps,
            :func:`pbnn.engine.sgmcmc.map_warm_start`) before the first cycle for a BNN without a
            learned noise scale (classification, fixed-noise regression); otherwise the
            network's initialisation (``"net"``; a Pyro model: its prior median). From the
            initialisation the noise-free exploration stages, SGD at an average rate
            ``alpha_0 / 2``, under-train a classifier in the default budget (digits:
            single-draw train accuracy 0.94 in cycle 0; moons accuracy 0.88 against 0.96
            warm-started). With a learned noise scale the warm start hurts: the exploration
            stages then pull the scale down onto the training residuals of the trained net
            (Friedman, seed 0: test NLL 1.17 warm-started against 0.36 from scratch).
        others: as :class:`SGLD` (no ``schedule``).

    ``sample_stats["cycle"]`` holds each draw's cycle (0-based) and
    ``sample_stats["step_size"]`` its learning rate. Draws of one cycle are correlated;
    draws of different cycles come from (possibly) different modes.

    Example:
        >>> import pbnn
        >>> pbnn.infer.CyclicalSGLD(num_cycles=5, exploration=0.8).num_cycles
        5
    """

    name = "csgld"
    default_step_size = 5e-3
    default_init = "auto"

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 0,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        num_cycles: int = 4,
        exploration: float = 0.5,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        super().__init__(
            num_samples, warmup, num_chains, step_size, batch_size, thinning, temperature, seed, progress, compile,
            init=init, map_steps=map_steps,
        )  # fmt: skip
        self._cyclical_init(num_cycles, exploration)

    def _kernel(self, model, seed):
        return CyclicalSGLDKernel(model, self.step_size, **self._cyclical_kwargs(), **self._common(seed))


@register("csghmc")
class CyclicalSGHMC(_CyclicalMixin, _SGMCMC):
    """Cyclical SGHMC (Zhang et al. 2020): :class:`CyclicalSGLD`'s schedule with SGHMC's
    momentum update; in the exploration stage it is SGD with momentum ``1 - friction``.

    Args:
        friction: ``a`` (default 0.9, the reference code's value; ``a = 1`` is cSGLD).
        step_size: ``alpha_0``; None: 2e-3 (5e-3 diverged at a cycle restart on the gap demo data).
        others: as :class:`CyclicalSGLD`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.CyclicalSGHMC().friction
        0.9
    """

    name = "csghmc"
    default_step_size = 2e-3
    default_init = "auto"

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 0,
        num_chains: int = 1,
        step_size: float | None = None,
        batch_size: int | None = None,
        thinning: int = 10,
        temperature: float = 1.0,
        num_cycles: int = 4,
        exploration: float = 0.5,
        friction: float = 0.9,
        seed: int | None = None,
        progress: bool = True,
        compile: bool | str = "auto",
        init: str | None = None,
        map_steps: int = 3000,
    ) -> None:
        super().__init__(
            num_samples, warmup, num_chains, step_size, batch_size, thinning, temperature, seed, progress, compile,
            init=init, map_steps=map_steps,
        )  # fmt: skip
        self._cyclical_init(num_cycles, exploration)
        if not isinstance(friction, (int, float)) or not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        self.friction = float(friction)

    def _kernel(self, model, seed):
        return CyclicalSGHMCKernel(
            model, self.step_size, friction=self.friction, **self._cyclical_kwargs(), **self._common(seed)
        )
