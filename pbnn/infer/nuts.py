"""NUTS and HMC: full-batch Hamiltonian Monte Carlo, several chains, diagnosed.

For a :class:`pbnn.BNN` both run pbnn's own sampler (:mod:`pbnn.engine.mcmc`) on the model's
functional potential (:class:`pbnn.potential.Potential`): the Pyro model is never traced
per leapfrog step, and all chains step together through one vectorised gradient. For a
hand-written Pyro model they run Pyro's ``NUTS`` / ``HMC`` kernels through ``pyro.infer.MCMC``.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0] + 0.5 * torch.randn(30)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    >>> post = pbnn.fit(model, x, y, method="nuts", num_samples=50, warmup=50, num_chains=2,
    ...                 init="net", progress=False, seed=0, warn=False)
    >>> post.samples["weight"].shape, sorted(post.sample_stats)
    (torch.Size([2, 50, 1, 1]), ['acceptance_rate', 'diverging', 'lp', 'n_steps', 'step_size', 'tree_depth'])
"""

from __future__ import annotations

import time

import pyro
import torch

from pbnn.engine import distributed, mcmc
from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_positive, check_positive_int, register
from pbnn.core.model import BNN
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import seeded

__all__ = ["NUTS", "HMC"]


class _HamiltonianBackend(Backend):
    """What NUTS and HMC share: options, the BNN fast path, the Pyro path, diagnostics."""

    kernel = ""

    def _common(self, num_samples, warmup, num_chains, target_accept, init, init_jitter, map_steps, batch_size):
        mcmc.set_chain_options(
            self, num_samples=num_samples, warmup=warmup, num_chains=num_chains, target_accept=target_accept,
            init=init, init_jitter=init_jitter, map_steps=map_steps, batch_size=batch_size,
        )  # fmt: skip

    def _sampler_options(self) -> dict:
        raise NotImplementedError

    def _pyro_kernel(self, model):
        raise NotImplementedError

    def fit(self, model, data: Data) -> Posterior:
        start = time.perf_counter()
        with seeded(distributed.broadcast_seed(self.seed)):
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            if isinstance(model, BNN):
                samples, stats, fixed, info = self._fit_bnn(model, data, gen)
            else:

                def run(num_chains):
                    return mcmc.pyro_mcmc(
                        self._pyro_kernel,
                        model,
                        data,
                        num_samples=self.num_samples,
                        warmup=self.warmup,
                        num_chains=num_chains,
                        progress=self.progress,
                    )

                # distributed: chains spread over ranks, each seeded from (seed, chain index)
                parallel = distributed.in_context()
                samples, stats = (
                    distributed.map_chains(lambda c, g: run(1), self.num_chains, gen)
                    if parallel
                    else run(self.num_chains)
                )
                fixed, info = {}, {}
                info["draws_unconstrained"] = mcmc.flatten_sites(samples)
        flat = info.pop("draws_unconstrained")
        info["wall_time"] = time.perf_counter() - start
        if self.warn:
            info["diagnostics"] = mcmc.convergence_warning(flat, stats.get("diverging"), self.name.upper())
        return Posterior(model, samples, data=data, method=self.name, sample_stats=stats, fixed=fixed, info=info)

    def _fit_bnn(self, model: BNN, data: Data, gen: torch.Generator):
        potential = Potential(model, data)
        # Sampling never needs argument validation, and it costs time on every step.
        with pyro.validation_enabled(False):
            with distributed.rank_local():  # every rank starts all chains (the same MAP warm start)
                z0, fixed = mcmc.init_chains(
                    potential,
                    self.num_chains,
                    self.init,
                    jitter=self.init_jitter,
                    map_steps=self.map_steps,
                    generator=gen,
                    progress=self.progress,
                )
            fn = mcmc.value_and_grad(
                lambda z: potential.log_joint_batch(z, None, fixed),
                compile=mcmc.should_compile(self.compile, self.warmup + self.num_samples),
            )

            def run(z0, gen):
                return mcmc.sample_chains(
                    self.kernel,
                    fn,
                    z0,
                    num_samples=self.num_samples,
                    warmup=self.warmup,
                    target_accept=self.target_accept,
                    generator=gen,
                    progress=self.progress,
                    desc=f"{self.name.upper()} ({len(z0)} chains)",
                    **self._sampler_options(),
                )

            result = distributed.run_batched_chains(run, z0, gen)
        samples = mcmc.draws_to_sites(potential, result.draws)
        info = {
            "step_size": result.step_size,
            "inv_mass": result.inv_mass,
            "draws_unconstrained": result.draws,
        }
        return samples, result.stats, fixed, info


@register("nuts")
class NUTS(_HamiltonianBackend):
    """The No-U-Turn sampler (Hoffman & Gelman 2014, in Stan's multinomial form).

    Args:
        num_samples: draws kept per chain.
        warmup: warm-up iterations per chain (discarded): step size by dual averaging,
            diagonal mass matrix in Stan's windows.
        num_chains: chains, run together in one vectorised batch.
        target_accept: mean acceptance probability that step-size adaptation aims at; raise it
            (0.9, 0.95) when there are divergences.
        max_tree_depth: at most ``2**max_tree_depth`` leapfrog steps per draw.
        init: ``"net"`` (the network's own initialisation, jittered per chain), ``"map"``
            (then ``map_steps`` of Adam per chain first), or a dict of site values.
        init_jitter: standard deviation of the per-chain jitter in the unconstrained space.
        map_steps: Adam steps of the MAP warm start (used for ``init="map"`` and to fit
            deterministic parameters, which the sampler then holds fixed).
        seed: seed for initialisation, momenta and proposals (None: torch's global RNG).
        progress: tqdm bar with each chain's step size and divergence count.
        warn: after the fit, warn when R-hat > 1.01, bulk ESS is low or transitions diverged.
        batch_size: must stay None: NUTS is full-batch (see ``method="sgld"`` / ``"sghmc"``).
        compile: ``torch.compile`` the gradient of the potential (:func:`pbnn.engine.mcmc.value_and_grad`):
            ``True``, ``False`` or ``"auto"`` (compile runs of at least
            ``pbnn.engine.mcmc.COMPILE_MIN_ITERATIONS`` iterations, where the ~10 s of compilation
            is repaid many times over).

    Example:
        >>> import pbnn
        >>> pbnn.infer.NUTS(num_samples=500, num_chains=2).num_chains
        2
    """

    name = "nuts"
    kernel = "nuts"

    def __init__(
        self,
        num_samples: int = 500,
        warmup: int = 500,
        num_chains: int = 4,
        target_accept: float = 0.8,
        max_tree_depth: int = 8,
        init: str | dict = "map",
        init_jitter: float = 0.1,
        map_steps: int = 1000,
        seed: int | None = None,
        progress: bool = True,
        warn: bool = True,
        batch_size: None = None,
        compile: bool | str = "auto",
    ) -> None:
        self._common(num_samples, warmup, num_chains, target_accept, init, init_jitter, map_steps, batch_size)
        self.compile = mcmc.check_compile(compile)
        self.max_tree_depth = check_positive_int("max_tree_depth", max_tree_depth)
        self.seed = seed
        self.progress = progress
        self.warn = warn

    def _sampler_options(self) -> dict:
        return {"max_tree_depth": self.max_tree_depth}

    def _pyro_kernel(self, model):
        from pyro.infer import NUTS as PyroNUTS

        return PyroNUTS(model, target_accept_prob=self.target_accept, max_tree_depth=self.max_tree_depth)


@register("hmc")
class HMC(_HamiltonianBackend):
    """Hamiltonian Monte Carlo with a fixed number of leapfrog steps per draw.

    Args:
        step_size: initial step size (None: found by Hoffman & Gelman's heuristic); the
            step size itself when ``adapt_step_size=False``.
        num_steps: leapfrog steps per draw (trajectory length ``step_size * num_steps``).
            Each draw jitters the step size by up to +-20% so trajectories are not periodic.
        adapt_step_size: dual averaging towards ``target_accept`` during warm-up.
        adapt_mass_matrix: diagonal mass matrix from the warm-up draws (Stan's windows).
        others: ``num_samples``, ``warmup``, ``num_chains``, ``target_accept``, ``init``,
            ``init_jitter``, ``map_steps``, ``seed``, ``progress``, ``warn``, ``batch_size`` and
            ``compile`` mean what they mean for :class:`NUTS`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.HMC(num_steps=30).num_steps
        30
    """

    name = "hmc"
    kernel = "hmc"

    def __init__(
        self,
        step_size: float | None = None,
        num_steps: int = 50,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        num_samples: int = 500,
        warmup: int = 500,
        num_chains: int = 4,
        target_accept: float = 0.8,
        init: str | dict = "map",
        init_jitter: float = 0.1,
        map_steps: int = 1000,
        seed: int | None = None,
        progress: bool = True,
        warn: bool = True,
        batch_size: None = None,
        compile: bool | str = "auto",
    ) -> None:
        self._common(num_samples, warmup, num_chains, target_accept, init, init_jitter, map_steps, batch_size)
        self.compile = mcmc.check_compile(compile)
        self.step_size = None if step_size is None else check_positive("step_size", step_size)
        if step_size is None and not adapt_step_size:
            raise ValueError("adapt_step_size=False needs a step_size=")
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.adapt_step_size = bool(adapt_step_size)
        self.adapt_mass_matrix = bool(adapt_mass_matrix)
        self.seed = seed
        self.progress = progress
        self.warn = warn

    def _sampler_options(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "step_size": self.step_size,
            "adapt_step_size": self.adapt_step_size,
            "adapt_mass_matrix": self.adapt_mass_matrix,
        }

    def _pyro_kernel(self, model):
        from pyro.infer import HMC as PyroHMC

        return PyroHMC(
            model,
            step_size=self.step_size if self.step_size is not None else 1.0,
            num_steps=self.num_steps,
            adapt_step_size=self.adapt_step_size,
            adapt_mass_matrix=self.adapt_mass_matrix,
            target_accept_prob=self.target_accept,
        )
