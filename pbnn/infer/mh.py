"""Random-walk Metropolis-Hastings: the textbook MCMC baseline, for small models.

Each step proposes ``z' = z + s * sqrt(v) * N(0, I)`` in the unconstrained space and
accepts with probability ``min(1, p(z') / p(z))``. During warm-up the per-coordinate
scales ``v`` come from the variance of the warm-up draws (in Stan's windows) and the global
scale ``s`` follows a Robbins-Monro rule towards 23.4% acceptance (Roberts, Gelman & Gilks
1997); both are frozen for sampling. Random-walk proposals need ``O(D)`` steps per
independent draw, so expect this to mix slowly on anything but small models: use NUTS for
BNNs. For a :class:`pbnn.BNN` all chains step together on the model's functional
potential (no gradients needed); a hand-written Pyro model runs Pyro's ``RandomWalkKernel``.

Example:
    >>> import torch, pbnn
    >>> x = torch.randn(30, 1); y = 2 * x[:, 0] + 0.5 * torch.randn(30)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    >>> post = pbnn.fit(model, x, y, method="mh", num_samples=100, warmup=200, thin=1, init="net",
    ...                 progress=False, seed=0, warn=False)
    >>> post.samples["weight"].shape, 0 < float(post.sample_stats["acceptance_rate"].mean()) < 1
    (torch.Size([4, 100, 1, 1]), True)
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from tqdm.auto import tqdm

from pbnn.engine import distributed, mcmc
from pbnn.core.data import Data
from pbnn.infer.base import Backend, check_positive, check_positive_int, register
from pbnn.core.model import BNN
from pbnn.posterior.posterior import Posterior
from pbnn.core.potential import Potential
from pbnn.engine.training import seeded

__all__ = ["MH", "rw_metropolis"]

TARGET_ACCEPT = 0.234


def rw_metropolis(
    log_density,
    z0: torch.Tensor,
    *,
    num_samples: int,
    warmup: int,
    thin: int = 1,
    init_scale: float = 0.1,
    target_accept: float = TARGET_ACCEPT,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "MH",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Adaptive random-walk Metropolis for chains ``z0 [C, D]`` of ``log_density(z [C, D]) -> [C]``.

    Returns ``(draws [C, S, D], stats {acceptance_rate, lp: [C, S]}, final scale [C])``; the
    acceptance rate of a kept draw is the mean Metropolis acceptance probability over the
    ``thin`` steps that produced it.

    Example:
        >>> import torch
        >>> d, st, s = rw_metropolis(lambda z: -0.5 * (z**2).sum(-1), torch.zeros(2, 3), num_samples=100,
        ...                          warmup=100, generator=torch.Generator().manual_seed(0), progress=False)
        >>> d.shape, st["acceptance_rate"].shape
        (torch.Size([2, 100, 3]), torch.Size([2, 100]))
    """
    C, D = z0.shape
    z = z0.clone()
    lp = log_density(z)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("the log density is not finite at the initial values; check the model and data")
    log_s = torch.full((C,), math.log(init_scale), dtype=z.dtype)
    scale_diag = torch.ones(C, D, dtype=z.dtype)
    window_ends = mcmc.warmup_windows(warmup)
    first = mcmc._first_window_start(warmup)
    kept: list[torch.Tensor] = []
    draws = torch.empty(C, num_samples, D, dtype=z.dtype)
    acc_rate = torch.zeros(C, num_samples, dtype=z.dtype)
    lps = torch.empty(C, num_samples, dtype=z.dtype)
    total = warmup + num_samples * thin
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    acc_sum = torch.zeros(C, dtype=z.dtype)
    for it in bar:
        prop = z + log_s.exp()[:, None] * scale_diag * torch.randn(C, D, generator=generator, dtype=z.dtype)
        lp_prop = torch.nan_to_num(log_density(prop), nan=-math.inf)
        acc = torch.exp(torch.clamp(lp_prop - lp, max=0.0))
        accept = torch.rand(C, generator=generator, dtype=z.dtype) < acc
        z = torch.where(accept[:, None], prop, z)
        lp = torch.where(accept, lp_prop, lp)
        if it < warmup:
            # Robbins-Monro on the log scale, decaying so adaptation settles.
            log_s = log_s + (acc - target_accept) / (it + 1) ** 0.6
            if window_ends and first <= it < window_ends[-1]:
                kept.append(z)
            if it + 1 in window_ends:
                scale_diag = mcmc._regularised_variance(torch.stack(kept)).sqrt()
                kept = []
                log_s = torch.full_like(log_s, math.log(2.38 / math.sqrt(D)))
        else:
            k = it - warmup
            acc_sum += acc
            if (k + 1) % thin == 0:
                s = k // thin
                draws[:, s] = z
                lps[:, s] = lp
                acc_rate[:, s] = acc_sum / thin
                acc_sum = torch.zeros_like(acc_sum)
        if progress and it % 50 == 0:
            bar.set_postfix({"scale": " ".join(f"{float(v):.2g}" for v in log_s.exp())})
    return draws, {"acceptance_rate": acc_rate, "lp": lps}, log_s.exp()


@register("mh")
class MH(Backend):
    """Random-walk Metropolis-Hastings with scale adaptation during warm-up.

    Args:
        num_samples: draws kept per chain (after thinning).
        warmup: adaptation steps per chain (discarded).
        num_chains: chains, stepped together in one vectorised batch.
        thin: keep every ``thin``-th draw (random-walk draws are strongly autocorrelated).
        init_scale: initial proposal scale in the unconstrained space.
        target_accept: acceptance rate the scale adaptation aims at (0.234, optimal for
            random-walk proposals in many dimensions).
        init, init_jitter, map_steps: as for :class:`pbnn.infer.NUTS` (default ``"map"``:
            random-walk chains are too slow to find a mode on their own).
        seed, progress, warn: as for :class:`pbnn.infer.NUTS`.
        batch_size: must stay None: MH is full-batch (see ``method="sgld"``).

    Example:
        >>> import pbnn
        >>> pbnn.infer.MH(thin=5).thin
        5
    """

    name = "mh"

    def __init__(
        self,
        num_samples: int = 1000,
        warmup: int = 2000,
        num_chains: int = 4,
        thin: int = 10,
        init_scale: float = 0.1,
        target_accept: float = TARGET_ACCEPT,
        init: str | dict = "map",
        init_jitter: float = 0.1,
        map_steps: int = 1000,
        seed: int | None = None,
        progress: bool = True,
        warn: bool = True,
        batch_size: None = None,
    ) -> None:
        mcmc.set_chain_options(
            self, num_samples=num_samples, warmup=warmup, num_chains=num_chains, target_accept=target_accept,
            init=init, init_jitter=init_jitter, map_steps=map_steps, batch_size=batch_size,
        )  # fmt: skip
        self.thin = check_positive_int("thin", thin)
        self.init_scale = check_positive("init_scale", init_scale)
        self.seed = seed
        self.progress = progress
        self.warn = warn

    def fit(self, model, data: Data) -> Posterior:
        start = time.perf_counter()
        with seeded(distributed.broadcast_seed(self.seed)):
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            if isinstance(model, BNN):
                samples, stats, fixed, flat, info = self._fit_bnn(model, data, gen)
            else:
                if distributed.in_context():  # chains spread over ranks, each seeded from (seed, chain index)
                    samples, stats = distributed.map_chains(
                        lambda c, g: self._fit_pyro(model, data, 1), self.num_chains, gen
                    )
                else:
                    samples, stats = self._fit_pyro(model, data)
                fixed, info = {}, {}
                flat = mcmc.flatten_sites(samples)
        info["wall_time"] = time.perf_counter() - start
        if self.warn:
            info["diagnostics"] = mcmc.convergence_warning(flat, None, "MH")
        return Posterior(model, samples, data=data, method=self.name, sample_stats=stats, fixed=fixed, info=info)

    def _fit_bnn(self, model: BNN, data: Data, gen: torch.Generator):
        potential = Potential(model, data)
        with pyro.validation_enabled(False), torch.no_grad():
            with torch.enable_grad(), distributed.rank_local():  # every rank starts all chains
                z0, fixed = mcmc.init_chains(
                    potential,
                    self.num_chains,
                    self.init,
                    jitter=self.init_jitter,
                    map_steps=self.map_steps,
                    generator=gen,
                    progress=self.progress,
                )

            def run(z0, gen):
                return rw_metropolis(
                    lambda z: potential.log_joint_batch(z, None, fixed),
                    z0,
                    num_samples=self.num_samples,
                    warmup=self.warmup,
                    thin=self.thin,
                    init_scale=self.init_scale,
                    target_accept=self.target_accept,
                    generator=gen,
                    progress=self.progress,
                    desc=f"MH ({len(z0)} chains)",
                )

            draws, stats, scale = distributed.run_batched_chains(run, z0, gen)
        return mcmc.draws_to_sites(potential, draws), stats, fixed, draws, {"scale": scale}

    def _fit_pyro(self, model, data: Data, num_chains: int | None = None):
        from pyro.infer import RandomWalkKernel

        samples, _ = mcmc.pyro_mcmc(
            lambda m: RandomWalkKernel(m, init_step_size=self.init_scale, target_accept_prob=self.target_accept),
            model,
            data,
            num_samples=self.num_samples * self.thin,
            warmup=self.warmup,
            num_chains=num_chains or self.num_chains,
            progress=self.progress,
        )
        # A continuous proposal was accepted exactly when the draw changed.
        changed = torch.stack(
            [(v[:, 1:] != v[:, :-1]).reshape(v.shape[0], v.shape[1] - 1, -1).any(-1) for v in samples.values()]
        ).any(0)
        moved = torch.cat([changed[:, :1], changed], 1).to(torch.get_default_dtype())
        C = moved.shape[0]
        acc = moved.reshape(C, self.num_samples, self.thin).mean(-1)
        samples = {k: v[:, self.thin - 1 :: self.thin] for k, v in samples.items()}
        return samples, {"acceptance_rate": acc}
