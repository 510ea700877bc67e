"""NUTS and HMC: full-batch Hamiltonian Monte Carlo, several chains, diagnosed.

Both run pbnn's own sampler (:mod:`pbnn.kernels.hmc` in :func:`pbnn.engine.chains.sample_hmc`)
on the model's potential (:class:`pbnn.potential.Potential`). For a :class:`pbnn.BNN` the
Pyro model is never traced per leapfrog step, and all chains step together through one
vectorised gradient; a hand-written Pyro model is traced once per chain per gradient.

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

from dataclasses import dataclass

import pyro

from pbnn.core.options import one_of, option, optional, positive, positive_int, probability
from pbnn.engine import chains, distributed
from pbnn.infer.base import Backend, ChainOptions, RunOptions, register
from pbnn.kernels.hmc import value_and_grad
from pbnn.posterior.diagnostics import convergence_warning

__all__ = ["NUTS", "HMC"]


@dataclass(frozen=True, kw_only=True)
class _Hamiltonian(Backend, RunOptions, ChainOptions):
    """What NUTS and HMC share: options, starts, the sampler run over chains, diagnostics."""

    kernel = ""
    target_accept: float = option(0.8, probability)
    batch_size: None = None
    compile: bool | str = option("auto", one_of(True, False, "auto"))

    def validate(self) -> None:
        super().validate()
        chains.check_chain_options(self)

    def _sampler_options(self) -> dict:
        raise NotImplementedError

    def run(self, potential):
        gen = chains.chain_generator()
        # Sampling never needs argument validation, and it costs time on every step.
        with pyro.validation_enabled(False):
            with distributed.rank_local():  # every rank starts all chains (the same MAP warm start)
                z0, fixed = chains.init_chains(
                    potential,
                    self.num_chains,
                    self.init,
                    jitter=self.init_jitter,
                    map_steps=self.map_steps,
                    generator=gen,
                    progress=self.progress,
                )
            iterations = self.warmup + self.num_samples * self.thinning
            compile = potential.kind == "bnn" and chains.should_compile(self.compile, iterations)
            fn = value_and_grad(lambda z: potential.log_joint_batch(z, None, fixed), compile=compile)

            def run(z0, gen):
                return chains.sample_hmc(
                    self.kernel,
                    fn,
                    z0,
                    num_samples=self.num_samples,
                    warmup=self.warmup,
                    thinning=self.thinning,
                    target_accept=self.target_accept,
                    generator=gen,
                    progress=self.progress,
                    desc=f"{self.name.upper()} ({len(z0)} chains)",
                    **self._sampler_options(),
                )

            result = distributed.run_batched_chains(run, z0, gen)
        info = dict(result.final)
        if self.warn:
            info["diagnostics"] = convergence_warning(result.draws, result.stats["diverging"], self.name.upper())
        samples = {k: v.detach() for k, v in potential.layout.constrain(result.draws).items()}
        return self.posterior(potential, samples, sample_stats=result.stats, fixed=fixed, info=info)


@register("nuts")
@dataclass(frozen=True, kw_only=True)
class NUTS(_Hamiltonian):
    """The No-U-Turn sampler (Hoffman & Gelman 2014, in Stan's multinomial form).

    Args:
        num_samples: draws kept per chain.
        warmup: warm-up iterations per chain (discarded): step size by dual averaging,
            diagonal mass matrix in Stan's windows.
        num_chains: chains, run together in one vectorised batch.
        thinning: keep every ``thinning``-th draw (default 1).
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
        warn: after the fit, warn when R-hat > 1.01, bulk ESS is low or transitions diverged
            (:func:`pbnn.posterior.diagnostics.convergence_warning`; numbers in ``info["diagnostics"]``).
        batch_size: must stay None: NUTS is full-batch (see ``method="sgld"`` / ``"sghmc"``).
        compile: ``torch.compile`` the gradient of a BNN's potential together with the NUTS
            leaf (:class:`pbnn.kernels.hmc.Target`): ``True``, ``False`` or ``"auto"`` (compile
            runs of at least ``pbnn.engine.chains.COMPILE_MIN_ITERATIONS`` iterations, where the
            ~10 s of compilation is repaid many times over); a Pyro model runs eagerly.

    Example:
        >>> import pbnn
        >>> pbnn.infer.NUTS(num_samples=500, num_chains=2).num_chains
        2
    """

    kernel = "nuts"
    max_tree_depth: int = option(8, positive_int)

    def _sampler_options(self) -> dict:
        return {"max_tree_depth": self.max_tree_depth}


@register("hmc")
@dataclass(frozen=True, kw_only=True)
class HMC(_Hamiltonian):
    """Hamiltonian Monte Carlo with a fixed number of leapfrog steps per draw.

    Args:
        step_size: initial step size (None: found by Hoffman & Gelman's heuristic); the
            step size itself when ``adapt_step_size=False``.
        num_leapfrog_steps: leapfrog steps per draw (trajectory length
            ``step_size * num_leapfrog_steps``; formerly ``num_steps``). Each draw jitters the
            step size by up to +-20% so trajectories are not periodic.
        adapt_step_size: dual averaging towards ``target_accept`` during warm-up.
        adapt_mass_matrix: diagonal mass matrix from the warm-up draws (Stan's windows).
        others: ``num_samples``, ``warmup``, ``num_chains``, ``thinning``, ``target_accept``,
            ``init``, ``init_jitter``, ``map_steps``, ``seed``, ``progress``, ``warn``,
            ``batch_size`` and ``compile`` mean what they mean for :class:`NUTS`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.HMC(num_leapfrog_steps=30).num_leapfrog_steps
        30
    """

    kernel = "hmc"
    renamed = {"num_steps": "num_leapfrog_steps"}
    step_size: float | None = option(None, optional(positive))
    num_leapfrog_steps: int = option(50, positive_int)
    adapt_step_size: bool = True
    adapt_mass_matrix: bool = True

    def validate(self) -> None:
        super().validate()
        if self.step_size is None and not self.adapt_step_size:
            raise ValueError("adapt_step_size=False needs a step_size=")

    def _sampler_options(self) -> dict:
        return {
            "num_leapfrog_steps": self.num_leapfrog_steps,
            "step_size": self.step_size,
            "adapt_step_size": self.adapt_step_size,
            "adapt_mass_matrix": self.adapt_mass_matrix,
        }
