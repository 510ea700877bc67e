"""NUTS and HMC: full-batch Hamiltonian Monte Carlo on the model's potential
(:func:`pbnn.engine.chains.sample_hmc`), all chains stepping together.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0] + 0.5 * torch.randn(30)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    >>> post = pbnn.fit(model, x, y, method="nuts", num_samples=50, warmup=50, num_chains=2,
    ...                 init="net", progress=False, seed=0, warn=False)
    >>> post.samples["weight"].shape, sorted(post.sample_stats)
    (torch.Size([2, 50, 1, 1]), ['acceptance_rate', 'diverging', 'energy', 'lp', 'n_steps', 'step_size', 'tree_depth'])
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro

from pbnn.core.options import one_of, option, optional, positive, positive_int, probability
from pbnn.engine import chains, distributed
from pbnn.infer.base import Backend, ChainOptions, RunOptions, register
from pbnn.kernels.hmc import value_and_grad

__all__ = ["NUTS", "HMC"]


@dataclass(frozen=True, kw_only=True)
class _Hamiltonian(Backend, RunOptions, ChainOptions):
    """What NUTS and HMC share: options, starts, the sampler run over chains, diagnostics."""

    full_batch = True

    kernel = ""
    sampler_options = ()  # the options passed on to pbnn.engine.chains.sample_hmc
    target_accept: float = option(0.8, probability)
    batch_size: None = None
    compile: bool | str = option("auto", one_of(True, False, "auto"))

    def validate(self) -> None:
        super().validate()
        chains.check_chain_options(self)

    def run(self, potential):
        gen = chains.chain_generator(potential.initial_z().device)
        # Sampling never needs argument validation, and it costs time on every step.
        with pyro.validation_enabled(False):
            z0, fixed = self.start_chains(potential, gen)
            # "auto" starts eagerly and compiles when the measured costs say it pays (AutoCompile);
            # a Pyro model's trace is first recorded as a graph of tensor ops (Target's trace=).
            fn = value_and_grad(
                lambda z: potential.log_joint_batch(z, None, fixed),
                compile=self.compile is True,
                trace=potential.kind != "bnn",
            )
            key = None if self.compile is False else chains.compile_key(potential)

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
                    compile_key=None if key is None else (*key, len(z0)),
                    **{k: getattr(self, k) for k in self.sampler_options},
                )

            result = distributed.run_batched_chains(run, z0, gen)
        if self.warn and self.kernel == "nuts":
            chains.tree_depth_warning(result.stats["tree_depth"], self.max_tree_depth, self.name.upper())
        return self.chain_posterior(potential, result, fixed, self.name.upper(), result.stats["diverging"])


@register("nuts")
@dataclass(frozen=True, kw_only=True)
class NUTS(_Hamiltonian):
    """The No-U-Turn sampler (Hoffman & Gelman 2014, in Stan's multinomial form).

    Args:
        warmup: warm-up iterations per chain (discarded): step size by dual averaging,
            diagonal mass matrix in Stan's windows. All chains run in one vectorised batch.
        target_accept: mean acceptance probability that step-size adaptation aims at; raise it
            (0.9, 0.95) when there are divergences.
        max_tree_depth: at most ``2**max_tree_depth`` leapfrog steps per draw.
        init: as in ``ChainOptions``, or a dict of site values; ``map_steps`` also fits
            deterministic parameters, which the sampler then holds fixed.
        warn: warn when R-hat > 1.01, bulk ESS is low or transitions diverged (numbers in
            ``info["diagnostics"]``), and when most transitions hit ``max_tree_depth``.
        batch_size: must stay None: NUTS is full-batch (see ``method="sgld"`` / ``"sghmc"``).
        compile: ``torch.compile`` the gradient of the potential together with the NUTS leaf
            (:class:`pbnn.kernels.hmc.Target`; a Pyro model's trace is first recorded as a graph
            of tensor operations): ``True``, ``False`` or ``"auto"`` (start eagerly, time the
            iterations and compile once the rest of the run repays the compilation, as measured in
            this process: :class:`pbnn.engine.chains.AutoCompile`; the progress bar says
            "compiling"). The switch changes the draws at float rounding, so for bitwise-repeatable
            runs in one process pass ``True`` or ``False``.
        others: as in ``ChainOptions`` and ``RunOptions``.

    Example:
        >>> import pbnn
        >>> pbnn.infer.NUTS(num_samples=500, num_chains=2).num_chains
        2
    """

    kernel = "nuts"
    sampler_options = ("max_tree_depth",)
    max_tree_depth: int = option(8, positive_int)


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
        others: as for :class:`NUTS`.

    Example:
        >>> import pbnn
        >>> pbnn.infer.HMC(num_leapfrog_steps=30).num_leapfrog_steps
        30
    """

    kernel = "hmc"
    sampler_options = ("num_leapfrog_steps", "step_size", "adapt_step_size", "adapt_mass_matrix")
    renamed = {"num_steps": "num_leapfrog_steps"}
    step_size: float | None = option(None, optional(positive))
    num_leapfrog_steps: int = option(50, positive_int)
    adapt_step_size: bool = True
    adapt_mass_matrix: bool = True

    def validate(self) -> None:
        super().validate()
        if self.step_size is None and not self.adapt_step_size:
            raise ValueError("adapt_step_size=False needs a step_size=")
