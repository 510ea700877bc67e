"""Random-walk Metropolis for a batch of chains (proposal ``z + s * sqrt(v) * N(0, I)``), with
warm-up adaptation of ``v`` (Stan's windows) and ``s`` (Robbins-Monro towards 23.4% acceptance).

Example:
    >>> import torch
    >>> from pbnn.kernels import mh
    >>> log_density = lambda z: -0.5 * (z**2).sum(-1)
    >>> gen = torch.Generator().manual_seed(0)
    >>> state = mh.init(log_density, torch.zeros(2, 3), proposal_scale=0.5)
    >>> state, info = mh.step(state, log_density, gen)
    >>> state.z.shape, info["acceptance_rate"].shape
    (torch.Size([2, 3]), torch.Size([2]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from pbnn.kernels.hmc import first_window_start, regularised_variance, warmup_windows

__all__ = ["TARGET_ACCEPT", "MHState", "init", "step", "WarmupState", "warmup_init", "adapt"]

TARGET_ACCEPT = 0.234


class MHState(NamedTuple):
    """Chains at ``z [C, D]`` with log density ``lp [C]``, log global scale ``log_s [C]`` and
    per-coordinate scales ``scale_diag [C, D]``."""

    z: torch.Tensor
    lp: torch.Tensor
    log_s: torch.Tensor
    scale_diag: torch.Tensor


def init(log_density: Callable, z0: torch.Tensor, proposal_scale: float = 0.1) -> MHState:
    z = z0.clone()
    lp = log_density(z)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError(
            "the log density is not finite at the initial values of some chains; "
            "check the model, its prior and the data (standardise x and y)"
        )
    C = z.shape[0]
    return MHState(z, lp, z.new_full((C,), math.log(proposal_scale)), torch.ones_like(z))


def step(state: MHState, log_density: Callable, gen: torch.Generator) -> tuple[MHState, dict[str, torch.Tensor]]:
    """One Metropolis step per chain; ``acceptance_rate`` is the acceptance probability."""
    z, lp, log_s, scale_diag = state
    C, D = z.shape
    prop = z + log_s.exp()[:, None] * scale_diag * torch.randn(C, D, generator=gen, dtype=z.dtype, device=z.device)
    lp_prop = torch.nan_to_num(log_density(prop), nan=-math.inf)
    acc = torch.exp(torch.clamp(lp_prop - lp, max=0.0))
    accept = torch.rand(C, generator=gen, dtype=z.dtype, device=z.device) < acc
    z = torch.where(accept[:, None], prop, z)
    lp = torch.where(accept, lp_prop, lp)
    return MHState(z, lp, log_s, scale_diag), {"acceptance_rate": acc, "lp": lp}


class WarmupState(NamedTuple):
    window_ends: tuple[int, ...]
    first: int
    kept: tuple[torch.Tensor, ...]


def warmup_init(warmup: int) -> WarmupState:
    return WarmupState(tuple(warmup_windows(warmup)), first_window_start(warmup), ())


def adapt(
    state: MHState, warm: WarmupState, info: dict, it: int, target_accept: float = TARGET_ACCEPT
) -> tuple[MHState, WarmupState]:
    """Warm-up iteration ``it``: Robbins-Monro on the log scale (decaying so adaptation
    settles); at the end of each slow window new per-coordinate scales and ``s = 2.38 / sqrt(D)``."""
    z, lp, log_s, scale_diag = state
    ends, first, kept = warm
    log_s = log_s + (info["acceptance_rate"] - target_accept) / (it + 1) ** 0.6
    if ends and first <= it < ends[-1]:
        kept = kept + (z,)
    if it + 1 in ends:
        scale_diag = regularised_variance(torch.stack(kept)).sqrt()
        kept = ()
        log_s = torch.full_like(log_s, math.log(2.38 / math.sqrt(z.shape[1])))
    return MHState(z, lp, log_s, scale_diag), WarmupState(ends, first, kept)
