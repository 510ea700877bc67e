"""Priors over a :class:`pbnn.BNN`'s weights: small ``nn.Module`` s mapping a parameter's name and
tensor to its Pyro distribution (constants in buffers, so ``model.to(device)`` moves them).

Example:
    >>> import torch, pbnn
    >>> prior = pbnn.priors.Normal(0.0, 1.0)
    >>> d = prior.distribution("0.weight", torch.zeros(3, 2))
    >>> d.batch_shape, d.event_shape
    (torch.Size([]), torch.Size([3, 2]))
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["Prior", "Normal", "LayerwiseNormal", "HierarchicalNormal"]


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(value: torch.Tensor, loc, scale) -> torch.Tensor:
    """Summed N(loc, scale^2) log density, written out: the hot path of every sampler."""
    scale = torch.as_tensor(scale)
    z = (value - loc) / scale
    return -0.5 * (z * z).sum() - value.numel() * (torch.log(scale) + _HALF_LOG_2PI)


def _fan_in(name: str, param: torch.Tensor, fan_ins: dict[str, int] | None) -> int:
    """Fan-in of the layer that owns ``param`` (biases use their layer's weight)."""
    if fan_ins and name in fan_ins:
        return fan_ins[name]
    if param.dim() >= 2:
        return int(math.prod(param.shape[1:]))
    return int(param.numel())


class Prior(nn.Module):
    """Base class: one distribution per network parameter.

    Subclasses implement :meth:`distribution`. A prior may also declare
    hyper-parameters as Pyro sample sites by overriding :meth:`sample_hyper`.
    """

    def distribution(
        self, name: str, param: torch.Tensor, hyper: dict[str, torch.Tensor] | None = None
    ) -> dist.Distribution:
        raise NotImplementedError

    def log_prob(self, name: str, value: torch.Tensor, hyper: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Log density of one parameter tensor (summed); subclasses may override for speed."""
        return self.distribution(name, value, hyper).log_prob(value)

    def fixed_normal(self, name: str, param: torch.Tensor) -> tuple[float, float] | None:
        """``(loc, scale)`` when this parameter's prior is a fixed iid Normal, else None.

        The functional potential then evaluates all such weights in one fused expression.
        """
        return None

    def sample_hyper(self, names: list[str], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample hyper-parameter sites (none by default)."""
        return {}

    def hyper_log_prob(self, hyper: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log density of the hyper-parameters (for the functional potential)."""
        return torch.zeros(())

    def set_fan_ins(self, fan_ins: dict[str, int]) -> None:
        self._fan_ins = dict(fan_ins)


class Normal(Prior):
    """Independent ``N(loc, scale^2)`` on every weight and bias.

    Example:
        >>> import pbnn
        >>> pbnn.priors.Normal(0.0, 1.0).scale.item()
        1.0
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"prior scale must be positive, got {scale}")
        self.register_buffer("loc", torch.as_tensor(float(loc)))
        self.register_buffer("scale", torch.as_tensor(float(scale)))

    def distribution(self, name, param, hyper=None):
        return dist.Normal(self.loc, self.scale).expand(param.shape).to_event(param.dim())

    def log_prob(self, name, value, hyper=None):
        return _normal_log_prob(value, self.loc, self.scale)

    def fixed_normal(self, name, param):
        return float(self.loc), float(self.scale)

    def extra_repr(self) -> str:
        return f"loc={self.loc.item():g}, scale={self.scale.item():g}"


class LayerwiseNormal(Prior):
    """``N(0, scale^2 / fan_in)`` per layer (the "He/LeCun" prior of Neal 1996).

    The standard deviation of each weight shrinks as ``1/sqrt(fan_in)`` so the
    pre-activations keep unit scale whatever the width. Biases get ``bias_scale``.

    Example:
        >>> import torch, pbnn
        >>> p = pbnn.priors.LayerwiseNormal(scale=1.0)
        >>> p.distribution("0.weight", torch.zeros(5, 4)).stddev[0, 0].item()
        0.5
    """

    def __init__(self, scale: float = 1.0, bias_scale: float = 1.0) -> None:
        super().__init__()
        if not (scale > 0 and bias_scale > 0):
            raise ValueError("prior scales must be positive")
        self.register_buffer("scale", torch.as_tensor(float(scale)))
        self.register_buffer("bias_scale", torch.as_tensor(float(bias_scale)))
        self._fan_ins: dict[str, int] = {}

    def distribution(self, name, param, hyper=None):
        if param.dim() <= 1 and name.endswith("bias"):
            std = self.bias_scale
        else:
            std = self.scale / math.sqrt(_fan_in(name, param, self._fan_ins))
        return dist.Normal(torch.zeros_like(std), std).expand(param.shape).to_event(param.dim())

    def log_prob(self, name, value, hyper=None):
        std = self.distribution(name, value, hyper).base_dist.scale.reshape(-1)[0]
        return _normal_log_prob(value, 0.0, std)

    def fixed_normal(self, name, param):
        return 0.0, float(self.distribution(name, param).base_dist.scale.reshape(-1)[0])


class HierarchicalNormal(Prior):
    """``w ~ N(0, s_l^2)`` with a learned scale ``s_l ~ HalfNormal(hyper_scale)`` per tensor.

    Each parameter tensor ``name`` gets a hyper-parameter site ``name + ".prior_scale"``
    that inference treats like any other latent variable.

    Example:
        >>> import torch, pbnn
        >>> p = pbnn.priors.HierarchicalNormal(hyper_scale=1.0)
        >>> p.hyper_names(["0.weight"])
        ['0.weight.prior_scale']
    """

    suffix = ".prior_scale"

    def __init__(self, hyper_scale: float = 1.0) -> None:
        super().__init__()
        if not hyper_scale > 0:
            raise ValueError("hyper_scale must be positive")
        self.register_buffer("hyper_scale", torch.as_tensor(float(hyper_scale)))

    def hyper_names(self, names: list[str]) -> list[str]:
        return [n + self.suffix for n in names]

    def hyper_distribution(self) -> dist.Distribution:
        return dist.HalfNormal(self.hyper_scale)

    def sample_hyper(self, names, params):
        return {h: pyro.sample(h, self.hyper_distribution()) for h in self.hyper_names(names)}

    def hyper_log_prob(self, hyper):
        d = self.hyper_distribution()
        return sum((d.log_prob(v).sum() for v in hyper.values()), torch.zeros(()))

    def log_prob(self, name, value, hyper=None):
        return _normal_log_prob(value, 0.0, hyper[name + self.suffix])

    def distribution(self, name, param, hyper=None):
        if hyper is None or name + self.suffix not in hyper:
            raise ValueError(f"hierarchical prior needs the hyper-parameter {name + self.suffix!r}")
        s = hyper[name + self.suffix]
        loc = torch.zeros((), dtype=s.dtype, device=s.device)
        return dist.Normal(loc, s).expand(param.shape).to_event(param.dim())
