"""Stochastic-gradient MCMC: update rules, step-size schedules, and Pyro ``MCMCKernel`` drivers.

Three layers, kept apart (as in BlackJAX):

* **update rules** -- small pure functions on tensors: :func:`sgld_step`,
  :func:`sghmc_step`, :func:`psgld_step`. They are written in the *per-datum-loss* form of
  the cyclical SG-MCMC reference code: ``grad`` is the gradient of the mean loss per data
  point, ``L(theta) = -log p~(theta | D) / N`` (minibatch likelihood scaled by ``N / B``,
  prior included), ``lr`` its learning rate, and the injected noise is
  ``sqrt(2 * lr * T / N)``. This is Welling & Teh's rule
  ``theta + (eps / 2) grad log p~ + N(0, eps)`` with ``eps = 2 * lr / N``.
* **schedules** -- plain functions of the step: :func:`constant`, :func:`polynomial_decay`
  ``a (b + t)^-gamma``, :func:`cyclical_cosine` (Zhang et al. 2020) and
  :func:`is_exploration` (the first fraction beta of every cycle).
* **drivers** -- :class:`SGLDKernel`, :class:`SGHMCKernel`, :class:`PSGLDKernel`,
  :class:`CyclicalSGLDKernel`, :class:`CyclicalSGHMCKernel`: subclasses of Pyro's
  ``MCMCKernel``, so ``pyro.infer.MCMC`` runs them (progress bar, ``hook_fn``,
  ``summary``). A kernel owns its data (given to ``MCMC.run(x, y)``), draws its own
  minibatches, and keeps its own step counter for the schedule, burn-in and thinning.
  For a :class:`pbnn.BNN` the gradient comes from :class:`pbnn.potential.Potential`
  (no Pyro tracing per step); a hand-written Pyro model is traced with
  ``subsample=`` passed to its ``"data"`` plate, which scales the minibatch by ``N / B``.

One *transition* (one ``sample`` call, one kept or warm-up draw) is ``thinning`` gradient
steps; for the cyclical kernels it runs to the next collection point of a sampling stage.

Example:
    >>> import torch, pyro, pbnn
    >>> from pbnn.engine.sgmcmc import SGLDKernel
    >>> x = torch.randn(100, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(100)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> kernel = SGLDKernel(model, step_size=1e-3, seed=0)
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> round(float(mcmc.get_samples()["weight"].mean()), 1)
    2.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.infer.mcmc.util import initialize_model

from pbnn.engine import distributed
from pbnn.core.data import Data, validate
from pbnn.engine.mcmc import Target
from pbnn.core.model import BNN
from pbnn.core.potential import Potential
from pbnn.engine.training import batch_indices, resolve_batch_size, run_adam

__all__ = [
    "sgld_step",
    "sghmc_step",
    "psgld_step",
    "constant",
    "polynomial_decay",
    "cyclical_cosine",
    "is_exploration",
    "cycle_index",
    "chain_initial_params",
    "map_warm_start",
    "SGMCMCKernel",
    "SGLDKernel",
    "SGHMCKernel",
    "PSGLDKernel",
    "CyclicalSGLDKernel",
    "CyclicalSGHMCKernel",
]


# ---------------------------------------------------------------------------- update rules
def sgld_step(
    position: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SGLD step: ``theta - lr * grad + sqrt(2 * lr * T / N) * noise``.

    ``grad`` is the gradient of the per-datum loss ``-log p~(theta | D) / N``; ``noise`` a
    standard normal draw shaped like ``position``, or None for a plain gradient step (the
    exploration stage of cyclical SGLD).

    Example:
        >>> import torch
        >>> sgld_step(torch.tensor([1.0]), torch.tensor([2.0]), lr=0.5, num_data=4, noise=torch.tensor([1.0]))
        tensor([0.5000])
    """
    new = position - lr * grad
    if noise is not None:
        new = new + math.sqrt(2.0 * lr * temperature / num_data) * noise
    return new


def sghmc_step(
    position: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    friction: float = 0.1,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGHMC step (Chen et al. 2014, in cSGHMC's form); returns ``(position, momentum)``.

    ``momentum <- (1 - a) momentum - lr * grad + sqrt(2 * lr * a * T / N) * noise`` and
    ``position <- position + momentum``, with friction ``a`` (``a = 1`` is SGLD).

    Example:
        >>> import torch
        >>> sghmc_step(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]), lr=0.1, num_data=1, friction=0.5)
        (tensor([0.3000]), tensor([0.3000]))
    """
    momentum = (1.0 - friction) * momentum - lr * grad
    if noise is not None:
        momentum = momentum + math.sqrt(2.0 * lr * friction * temperature / num_data) * noise
    return position + momentum, momentum


def psgld_step(
    position: torch.Tensor,
    square_avg: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    num_data: int,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
    alpha: float = 0.99,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pSGLD step (Li et al. 2016): RMSprop-preconditioned SGLD; returns ``(position, square_avg)``.

    ``V <- alpha V + (1 - alpha) grad^2``, ``G = 1 / (eps + sqrt(V))``, then
    ``theta - lr * G * grad + sqrt(2 * lr * T * G / N) * noise``. The Gamma correction term
    is dropped, as in the paper's experiments.

    Example:
        >>> import torch
        >>> pos, v = psgld_step(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]), lr=0.1, num_data=1)
        >>> round(float(v), 4), round(float(pos), 3)
        (0.04, -1.0)
    """
    square_avg = alpha * square_avg + (1.0 - alpha) * grad * grad
    precond = 1.0 / (eps + square_avg.sqrt())
    new = position - lr * precond * grad
    if noise is not None:
        new = new + (2.0 * lr * temperature / num_data * precond).sqrt() * noise
    return new, square_avg


# ---------------------------------------------------------------------------- schedules
def constant(step: int, step_size: float) -> float:
    """Constant schedule.

    Example:
        >>> constant(10, 0.1)
        0.1
    """
    return step_size


def polynomial_decay(step: int, a: float, b: float, gamma: float) -> float:
    """Welling & Teh's ``a * (b + t)^-gamma``; ``gamma`` in (0.5, 1] makes the sum of step
    sizes diverge and the sum of their squares converge.

    Example:
        >>> polynomial_decay(0, 1.0, 1.0, 0.55), polynomial_decay(3, 1.0, 1.0, 0.5)
        (1.0, 0.5)
    """
    return a * (b + step) ** -gamma


def cyclical_cosine(step: int, step_size: float, num_steps: int, num_cycles: int) -> float:
    """Cyclical cosine step size (Zhang et al. 2020) at iteration ``k = step`` (1-based) of ``K``:
    ``alpha_0 / 2 * (cos(pi * mod(k - 1, ceil(K / M)) / ceil(K / M)) + 1)``.

    Example:
        >>> [round(cyclical_cosine(k, 1.0, 8, 2), 3) for k in range(1, 6)]
        [1.0, 0.854, 0.5, 0.146, 1.0]
    """
    length = math.ceil(num_steps / num_cycles)
    return step_size / 2 * (math.cos(math.pi * ((step - 1) % length) / length) + 1)


def is_exploration(step: int, num_steps: int, num_cycles: int, exploration: float) -> bool:
    """Whether iteration ``k = step`` (1-based) lies in the first fraction ``beta = exploration``
    of its cycle: ``mod(k - 1, ceil(K / M)) / ceil(K / M) < beta``.

    Example:
        >>> [is_exploration(k, 8, 2, 0.5) for k in range(1, 6)]
        [True, True, False, False, True]
    """
    length = math.ceil(num_steps / num_cycles)
    return ((step - 1) % length) / length < exploration


def cycle_index(step: int, num_steps: int, num_cycles: int) -> int:
    """0-based cycle of iteration ``k = step`` (1-based).

    Example:
        >>> [cycle_index(k, 8, 2) for k in (1, 4, 5, 8)]
        [0, 0, 1, 1]
    """
    return (step - 1) // math.ceil(num_steps / num_cycles)


# ---------------------------------------------------------------------------- gradient sources
class _BNNSource:
    """Flat unconstrained log joint of a pbnn.BNN on its functional potential (no Pyro trace)."""

    def __init__(self, model: BNN, data: Data) -> None:
        self.potential = Potential(model, data)
        self.names, self.shapes, self.sizes = self.potential.names, self.potential.shapes, self.potential.sizes
        # Pyro's MCMC wants constrained -> unconstrained transforms (it applies .inv to the draws).
        self.transforms = {n: t.inv for n, t in zip(self.names, self.potential.transforms)}
        # Deterministic parameters stay at the network's own values (e.g. a pretrained body).
        vals = model.parameter_values()
        self.fixed = {n: vals[n] for n in model.deterministic_names}

    def initial_z(self) -> torch.Tensor:
        return self.potential.initial_z()

    def log_joint(self, z: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return self.potential.log_joint(z, idx, self.fixed)


class _PyroSource:
    """Flat unconstrained log joint of a hand-written Pyro model, traced with ``subsample=idx``."""

    def __init__(self, model: Callable, data: Data, minibatch: bool) -> None:
        self.model, self.data, self.minibatch = model, data, minibatch
        with pyro.get_param_store().scope():
            init, _, transforms, trace = initialize_model(
                model, model_args=(data.x, data.y), init_strategy=pyro.infer.autoguide.init_to_median
            )
            self.fixed = {n: s["value"].detach().clone() for n, s in trace.nodes.items() if s["type"] == "param"}
        self.names = [n for n in trace.nodes if n in init]
        self.transforms = {n: transforms[n] for n in self.names if n in transforms}
        self.shapes = [init[n].shape for n in self.names]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self._init = torch.cat([init[n].reshape(-1) for n in self.names]).detach()

    def initial_z(self) -> torch.Tensor:
        return self._init.clone()

    def log_joint(self, z: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        unconstrained = dict(zip(self.names, (v.reshape(s) for v, s in zip(z.split(self.sizes), self.shapes))))
        values, log_det = {}, z.new_zeros(())
        for n, u in unconstrained.items():
            t = self.transforms.get(n)
            values[n] = u if t is None else t.inv(u)
            if t is not None:
                log_det = log_det - t.log_abs_det_jacobian(values[n], u).sum()
        kwargs = {} if idx is None else {"subsample": idx}
        with pyro.get_param_store().scope():
            for name, value in self.fixed.items():
                pyro.get_param_store()[name] = value
            tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(self.data.x, self.data.y, **kwargs)
        return tr.log_prob_sum() + log_det


def chain_initial_params(model, data: Data, chain: int) -> dict[str, torch.Tensor]:
    """Unconstrained initial values for chain ``chain``, for ``MCMC(initial_params=...)``.

    Chain 0 starts where :attr:`SGMCMCKernel.initial_params` does (a BNN's own network
    initialisation, prior medians elsewhere; ``init_to_median`` for a Pyro model). Later
    chains re-run the layers' ``reset_parameters()`` (a BNN) or Pyro's ``init_to_uniform``,
    using torch's global RNG, so seed it for reproducible starts.

    Example:
        >>> import torch, pbnn
        >>> model = pbnn.BNN(torch.nn.Linear(1, 1))
        >>> data = pbnn.data.validate(model, torch.randn(5, 1), torch.randn(5))
        >>> sorted(chain_initial_params(model, data, 1))
        ['bias', 'sigma', 'weight']
    """
    if isinstance(model, BNN):
        pot = Potential(model, data)
        z = pot.initial_z()
        if chain > 0:
            net = copy.deepcopy(model.net)
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            values, _ = pot.unpack(z)
            params = dict(net.named_parameters())
            values.update({n: params[n].detach() for n in model.bayesian_names})
            z = pot.pack(values)
        return {n: v.reshape(s) for n, v, s in zip(pot.names, z.split(pot.sizes), pot.shapes)}
    strategy = pyro.infer.autoguide.init_to_median if chain == 0 else pyro.infer.autoguide.init_to_uniform
    with pyro.get_param_store().scope():
        init, _, _, _ = initialize_model(model, model_args=(data.x, data.y), init_strategy=strategy)
    return {k: v.detach() for k, v in init.items()}


def map_warm_start(
    model,
    data: Data,
    params: dict[str, torch.Tensor],
    *,
    num_steps: int,
    batch_size: int | None = None,
    lr: float = 0.01,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Adam on the sampler's own target from ``params`` (unconstrained): ``init="map"``.

    The loss is the minibatch log joint in the unconstrained space (the density the
    kernels sample, likelihood scaled by ``N / B``), with :func:`pbnn.engine.training.run_adam`'s
    schedule (lr decaying 10x). For a :class:`pbnn.BNN` only the network's weights move: the
    noise scale and prior hyper-parameters stay at their starting values, because their
    joint mode is degenerate (a learned noise scale collapses onto the training residuals of
    an over-parameterised net, where no sampler step size is stable); deterministic
    parameters stay at the network's values, as while sampling. For a hand-written Pyro
    model every latent site moves. Returns the end point in the form of ``params``.

    Example:
        >>> import torch, pbnn
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(50, 1); y = 3 * x[:, 0]
        >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
        >>> data = pbnn.data.validate(model, x, y)
        >>> start = chain_initial_params(model, data, 0)
        >>> round(float(map_warm_start(model, data, start, num_steps=2000)["weight"]), 2)
        3.0
    """
    batch = resolve_batch_size(batch_size, len(data))
    if isinstance(model, BNN):
        source = _BNNSource(model, data)
        moving = set(model.bayesian_names)
    else:
        source = _PyroSource(model, data, minibatch=batch is not None)
        moving = set(source.names)
    parts = [params[n].reshape(-1).detach().clone().requires_grad_(n in moving) for n in source.names]
    with pyro.get_param_store().scope():
        run_adam(
            [p for p in parts if p.requires_grad],
            lambda idx: -source.log_joint(torch.cat(parts), idx),
            num_steps=num_steps,
            lr=lr,
            n=len(data),
            batch_size=batch,
            desc="MAP warm start",
            progress=progress,
            loss_name="-log joint/N",
        )
    z = torch.cat(parts).detach()
    if not torch.isfinite(z).all():
        raise ValueError("the MAP warm start diverged (NaN/inf); standardise x and y, or pass init='net'")
    return {n: v.reshape(s) for n, v, s in zip(source.names, z.split(source.sizes), source.shapes)}


# ---------------------------------------------------------------------------- drivers
class SGMCMCKernel(MCMCKernel):
    """Base driver: minibatches, step counter, schedule, thinning, divergence guard.

    Subclasses set the update rule (:meth:`_update`) and, for the cyclical ones, the
    schedule and the noise-off exploration stage.

    Args:
        model: a :class:`pbnn.BNN` or a Pyro model ``model(x, y=None, subsample=None)``.
        step_size: learning rate ``lr`` on the per-datum loss (the Langevin step is ``2 lr / N``).
        batch_size: minibatch size (None: full batch up to 2048 points, else 256).
        thinning: gradient steps per transition (per ``sample`` call).
        temperature: T scales the injected noise variance (T = 1: the Bayes posterior).
        schedule: ``"constant"`` or ``"polynomial"`` (``a (b + t)^-gamma`` with ``a`` chosen
            so that step 0 has ``step_size``).
        decay_b, decay_gamma: ``b`` and ``gamma`` of the polynomial schedule.
        seed: seed of the kernel's own generator (noise and minibatches).
        compile: ``torch.compile`` the minibatch gradient of a :class:`pbnn.BNN`'s potential
            (see :class:`pbnn.engine.mcmc.Target`): about ten seconds once, then a fraction of the
            eager per-step overhead. Worth it for long runs; ignored for Pyro models.
    """

    #: the name ArviZ/Pyro show for the method
    method = "sgmcmc"

    def __init__(
        self,
        model,
        step_size: float,
        *,
        batch_size: int | None = None,
        thinning: int = 1,
        temperature: float = 1.0,
        schedule: str = "constant",
        decay_b: float = 1000.0,
        decay_gamma: float = 0.55,
        seed: int | None = None,
        compile: bool = False,
    ) -> None:
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not isinstance(thinning, int) or thinning < 1:
            raise ValueError(f"thinning must be a positive integer, got {thinning!r}")
        if schedule not in ("constant", "polynomial"):
            raise ValueError(f"schedule must be 'constant' or 'polynomial', got {schedule!r}")
        if schedule == "polynomial" and not (0.5 < decay_gamma <= 1 and decay_b > 0):
            raise ValueError("the polynomial schedule needs decay_gamma in (0.5, 1] and decay_b > 0")
        self.model = model
        self.step_size = float(step_size)
        self.batch_size = batch_size
        self.thinning = thinning
        self.temperature = float(temperature)
        self.schedule = schedule
        self.decay_b, self.decay_gamma = float(decay_b), float(decay_gamma)
        self.seed = seed
        self.compile = bool(compile)
        self.transforms = None
        self._source = None
        self._init_override: torch.Tensor | None = None
        self._pending: dict | None = None
        self._generator: torch.Generator | None = None

    # -------------------------------------------------------------- Pyro MCMCKernel API
    def setup(self, warmup_steps: int, x=None, y=None, *args, **kwargs) -> None:
        """Take the data (``MCMC.run(x, y)``), build the gradient source, reset the chain state."""
        if x is None or y is None:
            raise ValueError("SG-MCMC kernels own their data: call MCMC(...).run(x, y)")
        if args or kwargs:
            raise ValueError("SG-MCMC kernels take exactly MCMC(...).run(x, y)")
        data = validate(self.model, x, y)
        self.num_data = len(data)
        batch = resolve_batch_size(self.batch_size, self.num_data)
        if isinstance(self.model, BNN):
            self._source = _BNNSource(self.model, data)
        else:
            from pbnn.infer.base import accepts_subsample

            if batch is not None and not accepts_subsample(self.model):
                raise ValueError(
                    "minibatch SG-MCMC needs the Pyro model to accept subsample= and pass it to "
                    "pyro.plate('data', N, subsample=subsample); or pass batch_size >= len(x)"
                )
            self._source = _PyroSource(self.model, data, batch is not None)
        self.transforms = dict(self._source.transforms)
        # NaN/inf must reach the divergence guard: no sanitising of the gradient here.
        source = self._source
        self._target = Target(
            lambda z, idx: source.log_joint(z[0], idx)[None],
            compile=self.compile and isinstance(source, _BNNSource),
            sanitise=False,
        )
        if self._pending is not None:  # initial_params set before the first setup (Pyro's MCMC does this)
            self._init_override, self._pending = self._flatten(self._pending), None
        if self._generator is None:  # kept across chains, so sequential chains differ
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._generator = torch.Generator().manual_seed(seed)
        if batch and distributed.is_active():  # data-parallel: each rank takes its share of a K-times larger batch
            batch *= distributed.world_size()
        self._batches = batch_indices(self.num_data, batch, self._generator) if batch else None
        self.warmup_steps = warmup_steps
        self._z = (self._init_override if self._init_override is not None else self._source.initial_z()).clone()
        self._last_params: dict | None = None
        self._step = 0
        self._transitions = 0
        self._lr = self.step_size
        self._state = self._init_state(self._z)
        self.stats: dict[str, list] = {"step_size": []}

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        """Unconstrained initial values ``{site: tensor}`` (the network's own init for a BNN)."""
        if self._source is None:
            raise RuntimeError("call setup (MCMC.run) first")
        return self._unflatten(self._z)

    @initial_params.setter
    def initial_params(self, params: dict[str, torch.Tensor]) -> None:
        if self._source is None:  # before setup: remember the dict, flatten it in setup
            self._pending = params
            self._init_override = None
            return
        self._init_override = self._flatten(params)

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One transition: gradient steps up to the next collection point; returns unconstrained params."""
        z = self._z if params is self._last_params else self._flatten(params)
        while True:
            self._step += 1
            lr = self._schedule(self._step)
            noisy = not self._exploring(self._step)
            z = self._one_step(z, lr, noisy)
            if noisy and self._collect(self._step):
                break
        self._z, self._lr = z, lr
        self._transitions += 1
        if self._transitions > self.warmup_steps:
            self._record()
        self._last_params = self._unflatten(z)
        return self._last_params

    def logging(self) -> dict:
        return {"step size": f"{self._lr:.2e}", "grad steps": self._step}

    def diagnostics(self) -> dict:
        return {"gradient_steps": self._step}

    # -------------------------------------------------------------- internals
    def _flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self._source.names]).detach()

    def _unflatten(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: v.reshape(s) for n, v, s in zip(self._source.names, z.split(self._source.sizes), self._source.shapes)
        }

    def _grad(self, z: torch.Tensor) -> torch.Tensor:
        """Gradient of the per-datum minibatch loss ``-log p~(z) / N`` (likelihood scaled by N / B)."""
        idx = next(self._batches) if self._batches is not None else None
        if distributed.is_active() and getattr(self._source, "minibatch", True):  # data-parallel: my share, summed
            z = z.detach().requires_grad_(True)
            g = distributed.data_parallel_grad(lambda rows: self._source.log_joint(z, rows), z, idx, self.num_data)
            return g.neg_().div_(self.num_data)
        _, g = self._target(z[None], idx)
        return g[0].neg().div_(self.num_data)

    def _one_step(self, z: torch.Tensor, lr: float, noisy: bool) -> torch.Tensor:
        grad = self._grad(z)
        noise = torch.randn(z.shape, generator=self._generator, dtype=z.dtype) if noisy else None
        with torch.no_grad():
            new = self._update(z, grad, lr, noise)
        if not torch.isfinite(new).all():
            raise ValueError(
                f"{type(self).__name__}: the parameters became NaN/inf at gradient step {self._step} "
                f"(step size {lr:.3g}); lower step_size (e.g. to {lr / 10:.3g}), standardise x and y, "
                "or use pSGLD"
            )
        return new

    def _schedule(self, step: int) -> float:
        if self.schedule == "polynomial":
            return polynomial_decay(
                step - 1, self.step_size * self.decay_b**self.decay_gamma, self.decay_b, self.decay_gamma
            )
        return constant(step, self.step_size)

    def _exploring(self, step: int) -> bool:
        return False

    def _collect(self, step: int) -> bool:
        return step % self.thinning == 0

    def _record(self) -> None:
        self.stats["step_size"].append(self._lr)

    def _init_state(self, z: torch.Tensor):
        return None

    def _update(self, z, grad, lr, noise):
        raise NotImplementedError


class SGLDKernel(SGMCMCKernel):
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011) as a Pyro ``MCMCKernel``.

    Args: see :class:`SGMCMCKernel`.

    Example:
        >>> import torch, pbnn
        >>> SGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), step_size=1e-3).thinning
        1
    """

    method = "sgld"

    def _update(self, z, grad, lr, noise):
        return sgld_step(z, grad, lr, self.num_data, self.temperature, noise)


class SGHMCKernel(SGMCMCKernel):
    """Stochastic-gradient HMC (Chen, Fox & Guestrin 2014) with friction ``a`` (momentum decay ``1 - a``).

    Args:
        friction: ``a`` in (0, 1]; ``a = 1`` is SGLD. Default 0.1 (momentum 0.9).
        others: see :class:`SGMCMCKernel`.

    Example:
        >>> import torch, pbnn
        >>> SGHMCKernel(pbnn.BNN(torch.nn.Linear(1, 1)), step_size=1e-3, friction=0.1).friction
        0.1
    """

    method = "sghmc"

    def __init__(self, model, step_size: float, *, friction: float = 0.1, **kwargs) -> None:
        if not 0 < friction <= 1:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        super().__init__(model, step_size, **kwargs)
        self.friction = float(friction)

    def _init_state(self, z):
        return torch.zeros_like(z)

    def _update(self, z, grad, lr, noise):
        z, self._state = sghmc_step(z, self._state, grad, lr, self.num_data, self.friction, self.temperature, noise)
        return z


class PSGLDKernel(SGMCMCKernel):
    """Preconditioned SGLD (Li, Chen, Carlson & Carin 2016): RMSprop's diagonal preconditioner.

    Args:
        alpha: RMSprop's decay of the squared-gradient average (0.99).
        eps: RMSprop's ``lambda`` added to ``sqrt(V)`` (1e-5).
        others: see :class:`SGMCMCKernel`; ``step_size`` is an RMSprop learning rate.

    Example:
        >>> import torch, pbnn
        >>> PSGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), step_size=1e-3).alpha
        0.99
    """

    method = "psgld"

    def __init__(self, model, step_size: float, *, alpha: float = 0.99, eps: float = 1e-5, **kwargs) -> None:
        if not 0 < alpha < 1 or not eps > 0:
            raise ValueError(f"pSGLD needs 0 < alpha < 1 and eps > 0, got alpha={alpha!r}, eps={eps!r}")
        super().__init__(model, step_size, **kwargs)
        self.alpha, self.eps = float(alpha), float(eps)

    def _init_state(self, z):
        return torch.zeros_like(z)

    def _update(self, z, grad, lr, noise):
        z, self._state = psgld_step(
            z, self._state, grad, lr, self.num_data, self.temperature, noise, self.alpha, self.eps
        )
        return z


class _Cyclical:
    """Mixin: the cyclical cosine schedule with an exploration stage (Zhang et al. 2020).

    ``cycle_length`` gradient steps per cycle; the first fraction ``exploration`` of each
    cycle takes noise-free optimiser steps and yields no draws; in the sampling stage every
    ``thinning``-th step (counted back from the cycle's last step) is a draw.
    """

    def _cyclical_init(self, cycle_length: int, num_cycles: int, exploration: float) -> None:
        if not isinstance(cycle_length, int) or cycle_length < 1:
            raise ValueError(f"cycle_length must be a positive integer, got {cycle_length!r}")
        if not isinstance(num_cycles, int) or num_cycles < 1:
            raise ValueError(f"num_cycles must be a positive integer, got {num_cycles!r}")
        if not 0 <= exploration < 1:
            raise ValueError(f"exploration (the fraction beta) must be in [0, 1), got {exploration!r}")
        self.cycle_length, self.num_cycles, self.exploration = cycle_length, num_cycles, float(exploration)
        self.num_steps = cycle_length * num_cycles  # K; ceil(K / M) == cycle_length

    def _schedule(self, step):
        return cyclical_cosine(step, self.step_size, self.num_steps, self.num_cycles)

    def _exploring(self, step):
        return is_exploration(step, self.num_steps, self.num_cycles, self.exploration)

    def _collect(self, step):
        return (self.cycle_length - 1 - (step - 1) % self.cycle_length) % self.thinning == 0

    def _record(self):
        super()._record()
        self.stats.setdefault("cycle", []).append(cycle_index(self._step, self.num_steps, self.num_cycles))

    def logging(self):
        return {**super().logging(), "cycle": cycle_index(max(self._step, 1), self.num_steps, self.num_cycles)}


class CyclicalSGLDKernel(_Cyclical, SGLDKernel):
    """Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020).

    Args:
        cycle_length: gradient steps per cycle, ``ceil(K / M)``.
        num_cycles: M (the schedule keeps cycling if the run is longer).
        exploration: beta, the noise-free fraction at the start of each cycle.
        others: see :class:`SGMCMCKernel`; ``step_size`` is ``alpha_0``.

    Example:
        >>> import torch, pbnn
        >>> k = CyclicalSGLDKernel(pbnn.BNN(torch.nn.Linear(1, 1)), 0.1, cycle_length=100, num_cycles=4)
        >>> k.num_steps
        400
    """

    method = "csgld"

    def __init__(self, model, step_size: float, *, cycle_length: int, num_cycles: int, exploration: float = 0.5, **kw):
        super().__init__(model, step_size, **kw)
        self._cyclical_init(cycle_length, num_cycles, exploration)


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

    def __init__(
        self,
        model,
        step_size: float,
        *,
        cycle_length: int,
        num_cycles: int,
        exploration: float = 0.5,
        friction: float = 0.9,
        **kw,
    ):
        super().__init__(model, step_size, friction=friction, **kw)
        self._cyclical_init(cycle_length, num_cycles, exploration)
