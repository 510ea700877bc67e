"""SG-MCMC samplers as Pyro ``MCMCKernel`` classes: thin adapters over :mod:`pbnn.kernels.sgmcmc`.

:class:`SGLDKernel`, :class:`SGHMCKernel`, :class:`PSGLDKernel`, :class:`CyclicalSGLDKernel`
and :class:`CyclicalSGHMCKernel` let ``pyro.infer.MCMC`` run pbnn's update rules (progress
bar, ``hook_fn``, ``summary``). A kernel owns its data (given to ``MCMC.run(x, y)``), builds
the model's :class:`pbnn.potential.Potential` from it, draws its own minibatches
(:func:`pbnn.engine.chains.sg_gradient`) and keeps the sampler's state
(:class:`pbnn.kernels.sgmcmc.SGState`); one ``sample`` call is one
:func:`pbnn.kernels.sgmcmc.transition` (``thinning`` gradient steps; for the cyclical kernels,
up to the next collection point of a sampling stage). The ``pbnn.fit`` backends run the same
kernels through :func:`pbnn.engine.chains.sample_sgmcmc` instead.

Example:
    >>> import torch, pyro, pbnn
    >>> from pbnn.engine.sgmcmc import SGLDKernel
    >>> x = torch.randn(100, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(100)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> kernel = SGLDKernel(model, lr=1e-3, seed=0)
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> round(float(mcmc.get_samples()["weight"].mean()), 1)
    2.0
"""

from __future__ import annotations

import warnings

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from pbnn.core.data import validate
from pbnn.core.options import nonneg, one_of, positive, positive_int
from pbnn.core.potential import Potential
from pbnn.engine.chains import sg_gradient
from pbnn.kernels import sgmcmc

__all__ = ["SGMCMCKernel", "SGLDKernel", "SGHMCKernel", "PSGLDKernel", "CyclicalSGLDKernel", "CyclicalSGHMCKernel"]


class SGMCMCKernel(MCMCKernel):
    """Base adapter: data, potential, minibatches, the sampler state and the draws' statistics.

    Args:
        model: a :class:`pbnn.BNN` or a Pyro model ``model(x, y=None, subsample=None)``.
        lr: learning rate on the per-datum loss (the Langevin step is ``2 lr / N``; formerly
            ``step_size``, still accepted with a DeprecationWarning).
        batch_size: minibatch size (None: full batch up to 2048 points, else 256).
        thinning: gradient steps per transition (per ``sample`` call).
        temperature: T scales the injected noise variance (T = 1: the Bayes posterior).
        schedule: ``"constant"`` or ``"polynomial"`` (``a (b + t)^-gamma`` with ``a`` chosen
            so that step 0 has ``lr``).
        decay_b, decay_gamma: ``b`` and ``gamma`` of the polynomial schedule.
        seed: seed of the kernel's own generator (noise and minibatches).
        compile: ``torch.compile`` the minibatch gradient of a :class:`pbnn.BNN`'s potential
            (see :class:`pbnn.kernels.hmc.Target`): about ten seconds once, then a fraction of the
            eager per-step overhead. Worth it for long runs; ignored for Pyro models.
    """

    #: the name ArviZ/Pyro show for the method
    method = "sgmcmc"

    def __init__(
        self,
        model,
        lr: float | None = None,
        *,
        batch_size: int | None = None,
        thinning: int = 1,
        temperature: float = 1.0,
        schedule: str = "constant",
        decay_b: float = 1000.0,
        decay_gamma: float = 0.55,
        seed: int | None = None,
        compile: bool = False,
        step_size: float | None = None,
    ) -> None:
        if step_size is not None:
            warnings.warn(f"{type(self).__name__}: step_size= is now lr=", DeprecationWarning, stacklevel=2)
            lr = step_size if lr is None else lr
        self.model = model
        self.lr = positive("lr", lr)
        self.batch_size = batch_size
        self.thinning = positive_int("thinning", thinning)
        self.temperature = nonneg("temperature", temperature)
        self.schedule = one_of("constant", "polynomial")("schedule", schedule)
        if schedule == "polynomial" and not (0.5 < decay_gamma <= 1 and decay_b > 0):
            raise ValueError("the polynomial schedule needs decay_gamma in (0.5, 1] and decay_b > 0")
        self.decay_b, self.decay_gamma = float(decay_b), float(decay_gamma)
        self.seed, self.compile = seed, bool(compile)
        self.transforms = self.potential = self._generator = None
        self._init_override: torch.Tensor | dict | None = None

    # -------------------------------------------------------------- what subclasses change
    def _rule(self) -> sgmcmc.Rule:
        return sgmcmc.sgld(self.num_data, self.temperature)

    def _make_schedule(self) -> sgmcmc.Schedule:
        if self.schedule == "polynomial":
            return sgmcmc.polynomial_schedule(self.lr, self.decay_b, self.decay_gamma, self.thinning)
        return sgmcmc.constant_schedule(self.lr, self.thinning)

    def _schedule(self, step: int) -> float:
        """The learning rate of gradient step ``step`` (1-based)."""
        return self._make_schedule().lr(step)

    # -------------------------------------------------------------- Pyro MCMCKernel API
    def setup(self, warmup_steps: int, x=None, y=None, *args, **kwargs) -> None:
        """Take the data (``MCMC.run(x, y)``), build the potential and gradient, reset the chain state."""
        if x is None or y is None:
            raise ValueError("SG-MCMC kernels own their data: call MCMC(...).run(x, y)")
        if args or kwargs:
            raise ValueError("SG-MCMC kernels take exactly MCMC(...).run(x, y)")
        self.potential = Potential(self.model, validate(self.model, x, y))
        self.num_data = len(self.potential.data)
        # Pyro's MCMC wants constrained -> unconstrained transforms (it applies .inv to the draws).
        self.transforms = {n: t.inv for n, t in zip(self.potential.names, self.potential.transforms)}
        if isinstance(self._init_override, dict):  # initial_params set before the first setup (Pyro does this)
            self._init_override = self._flatten(self._init_override)
        if self._generator is None:  # kept across chains, so sequential chains differ
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._generator = torch.Generator().manual_seed(seed)
        self._grad = sg_gradient(self.potential, self.batch_size, self._generator, self.compile, self.method)
        self._rule_fns, self._sched = self._rule(), self._make_schedule()
        start = self._init_override if self._init_override is not None else self.potential.initial_z()
        self._state = sgmcmc.init(self._rule_fns, start.clone(), self.lr)
        self.warmup_steps, self._transitions, self._last_params = warmup_steps, 0, None
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
        self._init_override = params if self.potential is None else self._flatten(params)

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One transition: gradient steps up to the next collection point; returns unconstrained params."""
        z = self._state.z if params is self._last_params else self._flatten(params)
        self._state, info = sgmcmc.transition(
            self._state._replace(z=z), self._grad, self._rule_fns, self._sched, self._generator, type(self).__name__
        )
        self._transitions += 1
        if self._transitions > self.warmup_steps:
            self.stats["step_size"].append(self._state.lr)
            if "cycle" in info:
                self.stats.setdefault("cycle", []).append(int(info["cycle"]))
        self._last_params = self.potential.layout.split(self._state.z)
        return self._last_params

    def logging(self) -> dict:
        return {"step size": f"{self._state.lr:.2e}", "grad steps": self._state.step}

    def diagnostics(self) -> dict:
        return {"gradient_steps": self._state.step}

    def _flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.potential.layout.join(params).detach()


class SGLDKernel(SGMCMCKernel):
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011) as a Pyro ``MCMCKernel``.

    Args: see :class:`SGMCMCKernel`.

    Example:
        >>> import torch, pbnn
        >>> SGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), lr=1e-3).thinning
        1
    """

    method = "sgld"


class SGHMCKernel(SGMCMCKernel):
    """Stochastic-gradient HMC (Chen, Fox & Guestrin 2014) with friction ``a`` (momentum decay ``1 - a``).

    Args:
        friction: ``a`` in (0, 1]; ``a = 1`` is SGLD. Default 0.1 (momentum 0.9).
        others: see :class:`SGMCMCKernel`.

    Example:
        >>> import torch, pbnn
        >>> SGHMCKernel(pbnn.BNN(torch.nn.Linear(1, 1)), lr=1e-3, friction=0.1).friction
        0.1
    """

    method = "sghmc"

    def __init__(self, model, lr: float | None = None, *, friction: float = 0.1, **kwargs) -> None:
        if not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        super().__init__(model, lr, **kwargs)
        self.friction = float(friction)

    def _rule(self):
        return sgmcmc.sghmc(self.num_data, self.friction, self.temperature)


class PSGLDKernel(SGMCMCKernel):
    """Preconditioned SGLD (Li, Chen, Carlson & Carin 2016): RMSprop's diagonal preconditioner.

    Args:
        alpha: RMSprop's decay of the squared-gradient average (0.99).
        eps: RMSprop's ``lambda`` added to ``sqrt(V)`` (1e-5).
        others: see :class:`SGMCMCKernel`; ``lr`` is an RMSprop learning rate.

    Example:
        >>> import torch, pbnn
        >>> PSGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), lr=1e-3).alpha
        0.99
    """

    method = "psgld"

    def __init__(self, model, lr: float | None = None, *, alpha: float = 0.99, eps: float = 1e-5, **kwargs) -> None:
        if not 0 < alpha < 1 or not eps > 0:
            raise ValueError(f"pSGLD needs 0 < alpha < 1 and eps > 0, got alpha={alpha!r}, eps={eps!r}")
        super().__init__(model, lr, **kwargs)
        self.alpha, self.eps = float(alpha), float(eps)

    def _rule(self):
        return sgmcmc.psgld(self.num_data, self.temperature, self.alpha, self.eps)


class _Cyclical:
    """Mixin: the cyclical cosine schedule with an exploration stage (Zhang et al. 2020).

    ``cycle_length`` gradient steps per cycle; the first fraction ``exploration`` of each
    cycle takes noise-free optimiser steps and yields no draws; in the sampling stage every
    ``thinning``-th step (counted back from the cycle's last step) is a draw.
    """

    def __init__(self, model, lr=None, *, cycle_length: int, num_cycles: int, exploration: float = 0.5, **kw):
        super().__init__(model, lr, **kw)
        self.cycle_length = positive_int("cycle_length", cycle_length)
        self.num_cycles = positive_int("num_cycles", num_cycles)
        if not 0 <= exploration < 1:
            raise ValueError(f"exploration (the fraction beta) must be in [0, 1), got {exploration!r}")
        self.exploration = float(exploration)
        self.num_steps = cycle_length * num_cycles  # K; ceil(K / M) == cycle_length

    def _make_schedule(self):
        return sgmcmc.cyclical_schedule(self.lr, self.cycle_length, self.num_cycles, self.exploration, self.thinning)

    def logging(self):
        return {**super().logging(), "cycle": sgmcmc.cycle_index(max(self._step, 1), self.num_steps, self.num_cycles)}


class CyclicalSGLDKernel(_Cyclical, SGLDKernel):
    """Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020).

    Args:
        cycle_length: gradient steps per cycle, ``ceil(K / M)``.
        num_cycles: M (the schedule keeps cycling if the run is longer).
        exploration: beta, the noise-free fraction at the start of each cycle.
        others: see :class:`SGMCMCKernel`; ``lr`` is ``alpha_0``.

    Example:
        >>> import torch, pbnn
        >>> k = CyclicalSGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), 0.1, cycle_length=100, num_cycles=4)
        >>> k.num_steps
        400
    """

    method = "csgld"


class CyclicalSGHMCKernel(_Cyclical, SGHMCKernel):
    """Cyclical SGHMC (Zhang et al. 2020): :class:`SGHMCKernel` on the cyclical schedule.

    Args: as :class:`CyclicalSGLDKernel`, plus ``friction`` (default 0.9, the reference
    code's ``alpha``; ``1 - friction`` is the momentum).

    Example:
        >>> import torch, pbnn
        >>> k = CyclicalSGHMCKernel(pbnn.BNN(torch.nn.Linear(1, 1)), 0.1, cycle_length=100, num_cycles=4)
        >>> k.friction
        0.9
    """

    method = "csghmc"

    def __init__(self, model, lr=None, *, friction: float = 0.9, **kw):
        super().__init__(model, lr, friction=friction, **kw)
