"""Convergence diagnostics from ArviZ: rank-normalised split R-hat, bulk ESS and divergences
(:func:`convergence_warning`, called by the samplers' backends).

Example:
    >>> import torch
    >>> draws = torch.randn(4, 500, 2, generator=torch.Generator().manual_seed(0))
    >>> float(rhat(draws).max()) < 1.01, float(ess_bulk(draws).min()) > 1000
    (True, True)
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import torch

__all__ = ["rhat", "ess_bulk", "convergence_warning"]


def _dataset(draws: torch.Tensor):
    return az.convert_to_dataset(draws.detach().double().reshape(draws.shape[0], draws.shape[1], -1).cpu().numpy())


def rhat(draws: torch.Tensor) -> torch.Tensor:
    """Rank-normalised split R-hat per coordinate of draws ``[C, S, ...]`` (``az.rhat``), flattened."""
    return torch.as_tensor(az.rhat(_dataset(draws))["x"].values).to(draws.device, draws.dtype)


def ess_bulk(draws: torch.Tensor) -> torch.Tensor:
    """Bulk effective sample size per coordinate of draws ``[C, S, ...]`` (``az.ess``), flattened."""
    return torch.as_tensor(az.ess(_dataset(draws), method="bulk")["x"].values).to(draws.device, draws.dtype)


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
            r, ess = rhat(draws), ess_bulk(draws)
        out["max_rhat"] = float(torch.nan_to_num(r, nan=math.inf).max())
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
