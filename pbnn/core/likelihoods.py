"""Observation models: a likelihood maps the network output ``f [..., N, out_dim]`` (and its
noise sites) to a distribution over ``y`` with batch shape ``[..., N]``. Targets are ``[N]``
for one output (``[N, 1]`` is flattened), ``[N, D]`` for ``D > 1``.

Outputs with extra dimensions (a network returning ``[N, D1, D2]``, per-token logits
``[N, T, C]``, per-pixel logits ``[N, C, H, W]`` with ``Categorical(class_dim=1)``) keep
their shape: :class:`pbnn.BNN` sets :attr:`Likelihood.output_shape`, the flat ``f`` is viewed
in it, and the distribution has batch shape ``[..., N]`` with the extra dimensions in its
event (``log_prob`` sums them per point). Targets then have the shape ``[N, D1, D2]`` /
``[N, T]`` / ``[N, H, W]``.

Example:
    >>> import torch, pbnn
    >>> lik = pbnn.likelihoods.Gaussian(scale=0.5)
    >>> lik.conditional(torch.zeros(4, 1), {}).log_prob(torch.zeros(4)).shape
    torch.Size([4])
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

__all__ = [
    "Likelihood",
    "Gaussian",
    "HeteroscedasticGaussian",
    "MultiTaskGaussian",
    "Categorical",
    "Bernoulli",
]


class Likelihood(nn.Module):
    """Base class. Subclasses set ``is_classification`` and implement the hooks."""

    is_classification: bool = False
    #: the network's per-point output shape when it has extra dimensions (set by pbnn.BNN), else None
    output_shape: tuple[int, ...] | None = None
    supports_shaped_output: bool = False

    def set_output_shape(self, shape: tuple[int, ...]) -> None:
        """Record the network's per-point output shape (extra dimensions: more than one)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            self.output_shape = None
            return
        if not self.supports_shaped_output:
            raise ValueError(
                f"{type(self).__name__} needs a network output of shape [N, D]; this network returns "
                f"[N, {', '.join(map(str, shape))}]. Flatten it (torch.nn.Flatten()) or use Gaussian, "
                "Categorical or Bernoulli, which keep extra output dimensions"
            )
        self.output_shape = shape

    def _shaped(self, f: torch.Tensor) -> torch.Tensor:
        """``f [..., N, K]`` viewed as ``[..., N, *output_shape]``."""
        return f.reshape(f.shape[:-1] + self.output_shape)

    def noise_sites(self, out_dim: int) -> dict[str, dist.Distribution]:
        """Priors of the likelihood's own latent variables (e.g. a learned noise scale)."""
        return {}

    def conditional(self, f: torch.Tensor, noise: dict[str, torch.Tensor]) -> dist.Distribution:
        """``p(y | f, noise)`` with batch shape ``f.shape[:-1]``."""
        raise NotImplementedError

    def log_prob(self, f: torch.Tensor, noise: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y | f, noise)``, batch shape ``f.shape[:-1]``.

        Equal to ``conditional(f, noise).log_prob(y)``; subclasses write it out without
        building a distribution object, because samplers call it once per gradient.
        """
        return self.conditional(f, noise).log_prob(y)

    def validate_targets(self, y: torch.Tensor, out_dim: int) -> torch.Tensor:
        """Check ``y`` against the network output size; return it in canonical form."""
        raise NotImplementedError


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_real_targets(y: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    if y.dtype == torch.bool or not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{what} targets must be real numbers, got dtype {y.dtype}")
    y = y.to(torch.get_default_dtype()) if not y.is_floating_point() else y
    if dim == 1:
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1:
            raise ValueError(f"the network has 1 output, so y must have shape [N] or [N, 1]; got {tuple(y.shape)}")
    elif y.dim() != 2 or y.shape[1] != dim:
        raise ValueError(f"the network has {dim} outputs, so y must have shape [N, {dim}]; got {tuple(y.shape)}")
    return y


def _check_shaped_targets(y: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Real targets of the network's per-point output shape: ``[N, *shape]``."""
    if y.dtype == torch.bool or not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{what} targets must be real numbers, got dtype {y.dtype}")
    y = y.to(torch.get_default_dtype()) if not y.is_floating_point() else y
    if tuple(y.shape[1:]) != tuple(shape):
        dims = ", ".join(map(str, shape))
        raise ValueError(f"the network's output is [N, {dims}], so y must have shape [N, {dims}]; got {tuple(y.shape)}")
    return y


def _squeeze_single(f: torch.Tensor, dim: int) -> torch.Tensor:
    return f[..., 0] if dim == 1 else f


def _normal(loc: torch.Tensor, scale: torch.Tensor, dim: int) -> dist.Distribution:
    d = dist.Normal(loc, scale)
    return d if dim == 1 else d.to_event(1)


class Gaussian(Likelihood):
    """``y ~ N(f, scale^2)`` with a fixed scale or a learned one (``scale="learned"``).

    A learned scale is the latent site ``"sigma"`` with prior ``HalfNormal(scale_prior)``,
    so full-Bayesian backends (NUTS, SVI) infer it and MAP estimates it.

    Example:
        >>> import pbnn
        >>> pbnn.likelihoods.Gaussian(scale="learned").noise_sites(1)["sigma"].event_shape
        torch.Size([])
    """

    def __init__(self, scale: float | str = "learned", scale_prior: float = 1.0) -> None:
        super().__init__()
        if isinstance(scale, str):
            if scale != "learned":
                raise ValueError(f"scale must be a positive float or 'learned', got {scale!r}")
            self.learned = True
            scale = 1.0
        else:
            self.learned = False
            if not scale > 0:
                raise ValueError(f"noise scale must be positive, got {scale}")
        self.register_buffer("scale", torch.as_tensor(float(scale)))
        self.register_buffer("scale_prior", torch.as_tensor(float(scale_prior)))

    def noise_sites(self, out_dim):
        return {"sigma": dist.HalfNormal(self.scale_prior)} if self.learned else {}

    supports_shaped_output = True

    def _loc_sigma(self, f, noise):
        loc = self._shaped(f) if self.output_shape else _squeeze_single(f, f.shape[-1])
        sigma = noise["sigma"] if self.learned else self.scale
        # sigma has the draw dims of f (if any) but not the data dims: align it.
        return loc, sigma.reshape(sigma.shape + (1,) * (loc.dim() - sigma.dim()))

    def conditional(self, f, noise):
        loc, sigma = self._loc_sigma(f, noise)
        if self.output_shape:
            return dist.Normal(loc, sigma.expand_as(loc)).to_event(len(self.output_shape))
        return _normal(loc, sigma.expand_as(loc), f.shape[-1])

    def log_prob(self, f, noise, y):
        dim = f.shape[-1]
        loc, sigma = self._loc_sigma(f, noise)
        u = (y - loc) / sigma
        lp = -0.5 * u * u - torch.log(sigma) - _HALF_LOG_2PI
        if self.output_shape:
            return lp.flatten(-len(self.output_shape)).sum(-1)
        return lp if dim == 1 else lp.sum(-1)

    def validate_targets(self, y, out_dim):
        if self.output_shape:
            return _check_shaped_targets(y, self.output_shape, "Gaussian")
        return _check_real_targets(y, out_dim, "Gaussian")


class HeteroscedasticGaussian(Likelihood):
    """``y ~ N(mu(x), sigma(x)^2)`` where the network outputs ``[mu, log sigma]``.

    A network with ``2 D`` outputs models ``D`` targets: the first half of the output is
    the mean, the second half the log standard deviation.

    Example:
        >>> import torch, pbnn
        >>> d = pbnn.likelihoods.HeteroscedasticGaussian().conditional(torch.zeros(3, 2), {})
        >>> torch.allclose(d.stddev, torch.ones(3))
        True
    """

    def __init__(self, min_scale: float = 1e-6) -> None:
        super().__init__()
        self.min_scale = float(min_scale)

    def conditional(self, f, noise):
        dim = f.shape[-1] // 2
        loc, log_scale = f[..., :dim], f[..., dim:]
        scale = torch.exp(log_scale) + self.min_scale
        return _normal(_squeeze_single(loc, dim), _squeeze_single(scale, dim), dim)

    def validate_targets(self, y, out_dim):
        if out_dim % 2:
            raise ValueError(
                f"HeteroscedasticGaussian needs an even number of network outputs (mean and log-scale), got {out_dim}"
            )
        return _check_real_targets(y, out_dim // 2, "HeteroscedasticGaussian")


class MultiTaskGaussian(Likelihood):
    """One regression task per output, each with its own learned noise scale.

    ``y[:, t] ~ N(f_t, sigma_t^2)``, ``sigma ~ HalfNormal(scale_prior)`` per task (site
    ``"sigma"`` of shape ``[T]``). Its negative log-likelihood is the uncertainty-weighted
    multi-task loss of Kendall, Gal and Cipolla (2018).

    Example:
        >>> import pbnn
        >>> pbnn.likelihoods.MultiTaskGaussian().noise_sites(3)["sigma"].event_shape
        torch.Size([3])
    """

    def __init__(self, scale_prior: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("scale_prior", torch.as_tensor(float(scale_prior)))

    def noise_sites(self, out_dim):
        return {"sigma": dist.HalfNormal(self.scale_prior).expand([out_dim]).to_event(1)}

    def conditional(self, f, noise):
        sigma = noise["sigma"]  # [..., T]
        sigma = sigma.reshape(sigma.shape[:-1] + (1,) * (f.dim() - sigma.dim()) + sigma.shape[-1:])
        return dist.Normal(f, sigma.expand_as(f)).to_event(1)

    def validate_targets(self, y, out_dim):
        if y.dim() == 1 and out_dim == 1:
            y = y[:, None]
        if y.dim() != 2 or y.shape[1] != out_dim:
            raise ValueError(
                f"MultiTaskGaussian needs y of shape [N, {out_dim}] (one column per task), got {tuple(y.shape)}"
            )
        return _check_real_targets(y, out_dim, "MultiTaskGaussian")


def _check_labels(y: torch.Tensor, num_classes: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    if y.is_floating_point():
        if not torch.all(y == torch.round(y)):
            raise ValueError(
                "class labels must be integers, got non-integer floats; pass y as a LongTensor of class indices"
            )
        raise ValueError("class labels must have an integer dtype (torch.long); convert with y.long()")
    if y.dim() != 1 + len(shape) or tuple(y.shape[1:]) != tuple(shape):
        expected = ", ".join(["N", *map(str, shape)])
        raise ValueError(f"class labels must have shape [{expected}], got {tuple(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"class labels must lie in [0, {num_classes}) for a network with {num_classes} outputs; "
            f"found labels in [{lo}, {hi}]"
        )
    return y.long()


class Categorical(Likelihood):
    """``y ~ Categorical(softmax(f))``: the network outputs one logit per class.

    Args:
        class_dim: the class dimension of a per-point output with extra dimensions: ``-1``
            (default) for per-token logits ``[N, T, C]``, ``1`` for per-pixel logits
            ``[N, C, H, W]`` (PyTorch's ``cross_entropy`` layout); counted in the output
            without the batch dimension when negative. Labels are the output's shape without it.

    Example:
        >>> import torch, pbnn
        >>> pbnn.likelihoods.Categorical().conditional(torch.zeros(2, 3), {}).probs[0]
        tensor([0.3333, 0.3333, 0.3333])
    """

    is_classification = True
    supports_shaped_output = True

    def __init__(self, class_dim: int = -1) -> None:
        super().__init__()
        if not isinstance(class_dim, int) or class_dim == 0:
            raise ValueError(f"class_dim must be a nonzero int (dim 0 is the batch), got {class_dim!r}")
        self.class_dim = class_dim

    def _axis(self) -> int:
        """The class axis within the per-point output shape."""
        k = len(self.output_shape)
        axis = self.class_dim - 1 if self.class_dim > 0 else k + self.class_dim
        if not 0 <= axis < k:
            raise ValueError(
                f"class_dim={self.class_dim} is out of range for a network output [N, {self.output_shape}]"
            )
        return axis

    def _logits(self, f: torch.Tensor) -> torch.Tensor:
        """``[..., N, *rest, C]``: the class dimension last."""
        if not self.output_shape:
            return f
        g = self._shaped(f)
        return g.movedim(g.dim() - len(self.output_shape) + self._axis(), -1)

    def conditional(self, f, noise):
        d = dist.Categorical(logits=self._logits(f))
        return d.to_event(len(self.output_shape) - 1) if self.output_shape else d

    def log_prob(self, f, noise, y):
        logits = self._logits(f)
        lp = torch.log_softmax(logits, -1).gather(-1, y.expand(logits.shape[:-1])[..., None])[..., 0]
        return lp.flatten(-(len(self.output_shape) - 1)).sum(-1) if self.output_shape else lp

    def validate_targets(self, y, out_dim):
        if self.output_shape:
            shape, axis = list(self.output_shape), self._axis()
            num = shape.pop(axis)
            return _check_labels(y, num, tuple(shape))
        if out_dim < 2:
            raise ValueError("Categorical needs a network with >= 2 outputs (one logit per class); use Bernoulli")
        return _check_labels(y, out_dim)


class Bernoulli(Likelihood):
    """``y ~ Bernoulli(sigmoid(f))`` for binary labels; the network has one output.

    Example:
        >>> import torch, pbnn
        >>> pbnn.likelihoods.Bernoulli().conditional(torch.zeros(2, 1), {}).probs
        tensor([0.5000, 0.5000])
    """

    is_classification = True
    supports_shaped_output = True

    def conditional(self, f, noise):
        if self.output_shape:  # one logit per element of a shaped output (e.g. per pixel)
            return dist.Bernoulli(logits=self._shaped(f)).to_event(len(self.output_shape))
        return dist.Bernoulli(logits=f[..., 0])

    def log_prob(self, f, noise, y):
        logits = self._shaped(f) if self.output_shape else f[..., 0]
        lp = -torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
        return lp.flatten(-len(self.output_shape)).sum(-1) if self.output_shape else lp

    def validate_targets(self, y, out_dim):
        if self.output_shape:
            if y.is_floating_point() and not torch.all((y == 0) | (y == 1)):
                raise ValueError("Bernoulli labels must be 0 or 1")
            return _check_labels(y.long(), 2, self.output_shape).to(torch.get_default_dtype())
        if out_dim != 1:
            raise ValueError(f"Bernoulli needs a network with exactly 1 output (the logit), got {out_dim}")
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.is_floating_point() and not torch.all((y == 0) | (y == 1)):
            raise ValueError("Bernoulli labels must be 0 or 1")
        return _check_labels(y.long(), 2).to(torch.get_default_dtype())
