"""Variance-reduced gradient estimators for mean-field Gaussian weights: local
reparameterisation (Kingma, Salimans & Welling 2015) and flipout (Wen et al. 2018), which sample
the output of ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers per example (``docs/svi.md``).

Both are forward hooks registered by :func:`perturbed` for one call and removed afterwards: the
network is evaluated with the weight MEANS (``torch.func.functional_call``) and each hook adds
the per-example noise to its module's output. Other layer types keep whole weight samples.

Example:
    >>> import torch
    >>> from pbnn.infer.reparam import perturbed
    >>> layer = torch.nn.Linear(3, 2)
    >>> x = torch.ones(2, 3)  # two identical inputs
    >>> with perturbed(layer, "local_reparam", {"weight": torch.ones(2, 3)}):
    ...     y = layer(x)
    >>> bool((y[0] != y[1]).all())  # independent noise per example
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ESTIMATORS", "SUPPORTED", "perturbed", "supported_layers", "unsupported_layers", "negative_elbo"]

ESTIMATORS = ("reparam", "local_reparam", "flipout")
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_supported(module: nn.Module) -> bool:
    # A subclass that overrides forward may compute something other than x W^T + b.
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        base = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, c))
        return type(module).forward is base.forward and type(module)._conv_forward is base._conv_forward
    return False


def _owners(net: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, list[str]]]:
    """Module name -> (module, its own parameter names among ``names``), for modules owning any."""
    wanted, out = set(names), {}
    for mod_name, mod in net.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [prefix + p for p, _ in mod.named_parameters(recurse=False) if prefix + p in wanted]
        if own:
            out[mod_name] = (mod, own)
    return out


def supported_layers(net: nn.Module, names: list[str]) -> list[str]:
    """Parameter names among ``names`` that belong to a Linear / Conv layer (sampled per example).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.LayerNorm(2))
        >>> supported_layers(net, ["0.weight", "0.bias", "1.weight"])
        ['0.weight', '0.bias']
    """
    return [p for _, (m, own) in _owners(net, names).items() if _is_supported(m) for p in own]


def unsupported_layers(net: nn.Module, names: list[str]) -> list[str]:
    """Names (with types) of the modules owning parameters in ``names`` that are not Linear / Conv.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.LayerNorm(2))
        >>> unsupported_layers(net, ["0.weight", "1.weight"])
        ["'1' (LayerNorm)"]
    """
    return [
        f"{n or '<root>'!r} ({type(m).__name__})" for n, (m, _) in _owners(net, names).items() if not _is_supported(m)
    ]


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's own linear map (stride, padding, groups, ...) with another weight, no bias."""
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, weight)
    return module._conv_forward(x, weight, None)


def _per_channel(module: nn.Module, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast against the layer output."""
    if isinstance(module, nn.Linear):
        return v
    return v.reshape(v.shape + (1,) * (module.weight.dim() - 2))  # [C_out, 1, ..., 1] over spatial dims


def _signs(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    # +-1 with probability 1/2 each (randint is several times faster than bernoulli_ on CPU)
    return torch.randint(0, 2, shape, dtype=like.dtype, device=like.device).mul_(2).sub_(1)


def _sign_shape(module: nn.Module, t: torch.Tensor) -> tuple[int, ...]:
    """One sign per (example, channel); shared over sequence / spatial positions of an example."""
    if isinstance(module, nn.Linear):
        return (t.shape[0],) + (1,) * (t.dim() - 2) + (t.shape[-1],) if t.dim() >= 2 else tuple(t.shape)
    spatial = module.weight.dim() - 2
    return tuple(t.shape[: t.dim() - spatial]) + (1,) * spatial


@contextlib.contextmanager
def perturbed(net: nn.Module, estimator: str, noise: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add per-example weight noise to the Linear / Conv layers of ``net`` while inside.

    The layers' own parameters (e.g. swapped in by ``functional_call``) are the weight means.
    ``noise`` maps parameter names (``"0.weight"``, ``"0.bias"``) to the weight standard
    deviations (``"local_reparam"``) or to one shared perturbation ``W - mu`` (``"flipout"``);
    parameters missing from it are deterministic. The hooks are removed on exit.

    Raises ValueError if a perturbed layer runs more than once in the block (weight sharing:
    independent noise per call would change the model).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1)
        >>> with perturbed(layer, "flipout", {"weight": torch.zeros(1, 2)}):  # no perturbation
        ...     torch.allclose(layer(torch.ones(3, 2)), layer.weight.sum() + layer.bias)
        True
    """
    if estimator not in ("local_reparam", "flipout"):
        raise ValueError(f"perturbed() needs estimator 'local_reparam' or 'flipout', got {estimator!r}")
    handles, seen = [], set()
    try:
        for mod_name, (mod, _) in _owners(net, list(noise)).items():
            if not _is_supported(mod):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            w, b = noise.get(prefix + "weight"), noise.get(prefix + "bias")
            hook = _lrt_hook if estimator == "local_reparam" else _flipout_hook
            handles.append(mod.register_forward_hook(_guard(mod_name, seen, hook, w, b)))
        yield
    finally:
        for h in handles:
            h.remove()


def _guard(name, seen, hook, w, b):
    def run(module, inputs, output):
        if name in seen:
            raise ValueError(
                f"layer {name!r} runs more than once per forward pass (shared weights); local_reparam and "
                "flipout would draw independent noise for each use: use estimator='reparam' for this net"
            )
        seen.add(name)
        return hook(module, inputs[0], output, w, b)

    return run


def _lrt_hook(module, x, out, sd_w, sd_b):
    var = _apply(module, x * x, sd_w * sd_w) if sd_w is not None else torch.zeros_like(out)
    if sd_b is not None:
        var = var + _per_channel(module, sd_b * sd_b, out)
    # clamp: sqrt has an infinite derivative at 0 (e.g. an all-zero ReLU input row, no bias noise)
    return out + var.clamp_min(1e-20).sqrt() * torch.randn_like(out)


def _flipout_hook(module, x, out, dw, db):
    pert = _apply(module, x * _signs(_sign_shape(module, x), x), dw) if dw is not None else torch.zeros_like(out)
    if db is not None:
        pert = pert + _per_channel(module, db, out)
    return out + pert * _signs(_sign_shape(module, out), out)


def negative_elbo(potential, posterior, fixed: dict[str, torch.Tensor], estimator: str, num_particles: int = 1):
    """The negative ELBO of a mean-field guide on a BNN's potential, with the likelihood term
    sampled by ``estimator``; returns ``loss(idx)`` (``idx``: minibatch indices or None).

    ``posterior()`` returns the guide's current ``q(z) = Independent(Normal(loc, scale), 1)``
    over the flat unconstrained latent in ``potential``'s site order. With ``z ~ q``:

        -ELBO = -[ log p(theta(z)) + log|J(z)| - log q(z) ] - (N / B) sum_i log p(y_i | x_i, W_i)

    the first bracket as in plain reparameterisation, the likelihood with per-example weights
    ``W_i`` in the Linear / Conv layers (other layers use the weights in ``z``); see
    ``docs/svi.md`` for when the sum is unbiased. Warns, naming them, if Bayesian parameters
    live in other layer types.

    Example:
        >>> import torch, pbnn
        >>> from torch.distributions import Independent, Normal
        >>> model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
        >>> data = pbnn.data.validate(model, torch.randn(8, 2), torch.randn(8))
        >>> pot = pbnn.potential.Potential(model, data)
        >>> q = Independent(Normal(torch.zeros(pot.dim), torch.ones(pot.dim)), 1)
        >>> loss = negative_elbo(pot, lambda: q, {}, "local_reparam")
        >>> loss(None).shape
        torch.Size([])
    """
    if estimator not in ESTIMATORS[1:]:
        raise ValueError(f"negative_elbo needs estimator 'local_reparam' or 'flipout', got {estimator!r}")
    model = potential.model
    bayes = model.bayesian_names
    local = set(supported_layers(model.net, bayes))
    others = unsupported_layers(model.net, bayes)
    if others:
        warnings.warn(
            f"estimator={estimator!r} samples per example only in nn.Linear and nn.Conv1d/2d/3d layers; "
            f"these layers fall back to plain reparameterisation (one weight sample per minibatch): "
            f"{', '.join(others)}",
            UserWarning,
            stacklevel=3,
        )
    data, out_dim = potential.data, potential.out_dim

    def loss(idx: torch.Tensor | None) -> torch.Tensor:
        q = posterior()
        if not (isinstance(q, torch.distributions.Independent) and isinstance(q.base_dist, torch.distributions.Normal)):
            raise ValueError(f"estimator={estimator!r} needs a mean-field (diagonal Normal) guide")
        loc, scale = q.base_dist.loc, q.base_dist.scale
        x, y, ll_scale = data.rows(idx)
        mean, sd = potential.layout.split(loc), potential.layout.split(scale)
        total = torch.zeros((), dtype=loc.dtype, device=loc.device)
        for _ in range(num_particles):
            z = loc + scale * torch.randn_like(loc)
            sample, log_det = potential.unpack(z)
            rest = model.log_prior(sample, out_dim) + log_det - q.log_prob(z)
            weights = {**fixed, **{k: mean[k] if k in local else sample[k] for k in bayes}}
            noise = {k: sd[k] if estimator == "local_reparam" else sample[k] - mean[k] for k in local}
            with perturbed(model.net, estimator, noise):
                f = model.output(weights, x)
            ll = model.likelihood.log_prob(f, {k: sample[k] for k in model.noise_sites(out_dim)}, y)
            total = total + rest + ll_scale * ll.sum()
        return -total / num_particles

    return loss
