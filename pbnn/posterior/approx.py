"""A fitted distribution over the latent sites, kept by a Posterior for fresh draws.

Backends that fit a distribution (SVI guides, Laplace) describe it as a torch
distribution ``q`` over one flat *unconstrained* vector plus the list of sites it packs:
``(name, unconstrained shape, bijection to the site's support)``. Drawing from it never
needs the Pyro param store or the guide that produced it, so a saved Posterior can draw.

Example:
    >>> import torch, pbnn
    >>> from torch.distributions import MultivariateNormal, transforms
    >>> q = MultivariateNormal(torch.zeros(3), torch.eye(3))
    >>> a = pbnn.approx.FlatApproximation(q, [("w", torch.Size([2]), transforms.identity_transform),
    ...                                       ("sigma", torch.Size([]), transforms.ExpTransform())])
    >>> {k: tuple(v.shape) for k, v in a.sample(5, seed=0).items()}
    {'w': (5, 2), 'sigma': (5,)}
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, Transform

__all__ = ["FlatApproximation"]


class FlatApproximation:
    """``q(z)`` over a flat unconstrained vector ``z`` and how to unpack it into sites."""

    def __init__(self, q: Distribution, sites: list[tuple[str, torch.Size, Transform]]) -> None:
        dim = sum(int(math.prod(shape)) for _, shape, _ in sites)
        if q.event_shape != torch.Size([dim]):
            raise ValueError(f"q has event shape {tuple(q.event_shape)}, but the sites pack {dim} numbers")
        self.q = q
        self.sites = list(sites)

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``z`` of shape ``[..., D]`` into constrained site values ``[..., *shape]``."""
        out, pos = {}, 0
        batch = z.shape[:-1]
        for name, shape, transform in self.sites:
            size = int(math.prod(shape))
            out[name] = transform(z[..., pos : pos + size].reshape(batch + shape))
            pos += size
        return out

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` draws, each site ``[num_samples, *shape]``; reproducible with ``seed``."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            z = self.q.sample((num_samples,))
        return self.unpack(z)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """The site values at the mean of ``z`` (the mode for a Gaussian ``q``)."""
        return self.unpack(self.q.mean)
