"""Curvature of a BNN's log-likelihood at a point: the generalised Gauss-Newton
``sum_n J_n^T Lambda_n J_n`` full, diagonal or Kronecker-factored (KFAC), and output
Jacobians (``torch.func.jacrev`` vmapped over points; ``Lambda_n = L_n L_n^T`` in closed form).

Example:
    >>> import torch, pbnn
    >>> from pbnn.infer.curvature import ggn_full
    >>> model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
    >>> x = torch.randn(10, 2)
    >>> G = ggn_full(model, ["weight", "bias"], model.parameter_values(), x, {})
    >>> phi = torch.cat([x, torch.ones(10, 1)], 1)
    >>> torch.allclose(G, (phi.T @ phi / 0.25).double(), atol=1e-4)     # J^T J / sigma^2 for a linear model
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.transforms import identity_transform

from pbnn.core import likelihoods as _lik
from pbnn.core.potential import SiteLayout

__all__ = ["loss_hessian_sqrt", "output_jacobian", "ggn_full", "ggn_diag", "kfac_factors", "linear_layers"]

SUPPORTED_LIKELIHOODS = (_lik.Gaussian, _lik.MultiTaskGaussian, _lik.Bernoulli, _lik.Categorical)
CHUNK = 256  # data points per Jacobian / KFAC pass: bounds memory at CHUNK * outputs * D


def check_likelihood(likelihood) -> None:
    if not isinstance(likelihood, SUPPORTED_LIKELIHOODS):
        raise ValueError(
            f"GGN curvature supports Gaussian, MultiTaskGaussian, Bernoulli and Categorical likelihoods, "
            f"got {type(likelihood).__name__}; use hessian='full' (exact Hessian, small nets) or method='svi'"
        )


def loss_hessian_sqrt(likelihood, f: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L [N, C, C]`` with ``L L^T`` the Hessian of ``-log p(y | f)`` in ``f`` (per data point).

    Gaussian: ``I / sigma``; Bernoulli: ``sqrt(p (1 - p))``; Categorical:
    ``diag(sqrt p) - p sqrt(p)^T`` (its square is ``diag p - p p^T``).
    """
    check_likelihood(likelihood)
    n, c = f.shape
    if isinstance(likelihood, _lik.Bernoulli):
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt()[:, :, None]
    if isinstance(likelihood, _lik.Categorical):
        p = torch.softmax(f, -1)
        s = p.sqrt()
        return torch.diag_embed(s) - p[:, :, None] * s[:, None, :]
    if isinstance(likelihood, _lik.MultiTaskGaussian):
        sigma = noise["sigma"].reshape(c)
    else:
        sigma = (noise["sigma"] if likelihood.learned else likelihood.scale).reshape(()).expand(c)
    return torch.diag_embed((1.0 / sigma).expand(n, c))


def weight_layout(values: dict[str, torch.Tensor], names: list[str]) -> SiteLayout:
    """The :class:`pbnn.potential.SiteLayout` of the real-valued sites ``names`` (shapes from ``values``)."""
    return SiteLayout([(n, values[n].shape, identity_transform) for n in names])


def output_jacobian(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d f(x_n) / d theta`` for the parameters ``names``, ``[N, C, D]``.

    ``params`` holds every network parameter's value; ``torch.func.jacrev`` is vmapped over
    data points (so the cost is one reverse pass per output per point, batched).
    """
    layout = weight_layout(params, names)
    theta = layout.join(params)

    def f_one(th, x1):
        return model.output({**params, **layout.split(th)}, x1[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))
    was_training = model.net.training
    model.net.eval()
    try:
        return torch.cat([jac(theta, xb) for xb in x.split(CHUNK)], 0)
    finally:
        model.net.train(was_training)


def _scaled_jacobians(model, names, params, x, noise):
    """Yield ``L_n^T J_n`` ``[B, C, D]`` per chunk of data: the GGN is the sum of their squares."""
    for xb in x.split(CHUNK):
        J = output_jacobian(model, names, params, xb)
        with torch.no_grad():
            f = model.output(params, xb)
        L = loss_hessian_sqrt(model.likelihood, f, noise)
        yield torch.einsum("bck,bcd->bkd", L, J)


def ggn_full(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor, noise: dict) -> torch.Tensor:
    """Full GGN ``sum_n J_n^T Lambda_n J_n`` over the parameters ``names``, ``[D, D]``, in float64.

    Float64 because a float32 sum is indefinite by round-off when the GGN's eigenvalues span
    many decades, as they do for a well-fit regression net (e.g. eigenvalue -20 next to ~1e6
    on the Friedman benchmark), and the Laplace marginal likelihood needs its log-determinant.
    """
    G = None
    for LJ in _scaled_jacobians(model, names, params, x, noise):
        LJ = LJ.double()
        part = torch.einsum("bkd,bke->de", LJ, LJ)
        G = part if G is None else G + part
    return G


def ggn_diag(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor, noise: dict) -> torch.Tensor:
    """Diagonal of the GGN, ``[D]``, in float64 (exactly ``ggn_full(...).diagonal()``)."""
    g = None
    for LJ in _scaled_jacobians(model, names, params, x, noise):
        part = LJ.double().pow(2).sum((0, 1))
        g = part if g is None else g + part
    return g


# ----------------------------------------------------------------------------- KFAC
def linear_layers(model, names: list[str]) -> list[tuple[str, str, str | None]]:
    """``(module prefix, weight name, bias name or None)`` for every layer owning ``names``.

    KFAC needs each parameter in ``names`` to be the weight or bias of an ``nn.Linear``.
    """
    owners = {}
    for prefix, mod in model.net.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{prefix}.{pname}" if prefix else pname] = (prefix, mod)
    layers, seen = [], set()
    for n in names:
        prefix, mod = owners[n]
        if not isinstance(mod, nn.Linear):
            raise ValueError(
                f"hessian='kfac' supports nn.Linear layers only; parameter {n!r} belongs to a "
                f"{type(mod).__name__}; use hessian='diag' or 'ggn', or subset='last_layer'"
            )
        if prefix in seen:
            continue
        seen.add(prefix)
        w = f"{prefix}.weight" if prefix else "weight"
        b = (f"{prefix}.bias" if prefix else "bias") if mod.bias is not None else None
        if w not in names or (b is not None and b not in names):
            raise ValueError(
                f"hessian='kfac' needs a layer's weight and bias together; layer {prefix!r} is only partly in the "
                "subset; use hessian='diag' or 'ggn'"
            )
        layers.append((prefix, w, b))
    return layers


def kfac_factors(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor, noise: dict) -> dict:
    """Kronecker factors ``{prefix: (G [out, out], A [in+1, in+1])}`` of the GGN per ``nn.Linear``.

    With ``a_n`` the layer's input with a trailing 1 (the bias) and ``g_{n,k} = B_n^T L_n[:, k]``
    (``B_n`` the Jacobian of the output in the layer's pre-activation), the GGN block of the
    layer's ``[W | b]`` (row-major) is ``sum_n (sum_k g g^T) kron (a a^T)``; KFAC approximates it
    by ``G kron A`` with ``G = sum_n sum_k g g^T`` and ``A = sum_n a a^T / N``. It is exact for
    one data point, and whenever ``sum_k g g^T`` is the same for every point: e.g. the last
    layer with a Gaussian likelihood (``B = I``, ``Lambda = I / sigma^2``).
    """
    layers = linear_layers(model, names)
    mods = dict(model.net.named_modules())
    acts: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def hook(prefix):
        def fn(mod, inp, out):
            if inp[0].dim() != 2:
                raise ValueError(f"hessian='kfac' needs 2-D inputs to nn.Linear {prefix!r}, got {tuple(inp[0].shape)}")
            acts[prefix] = inp[0].detach()
            outs[prefix] = out

        return fn

    factors = {p: [0.0, 0.0] for p, _, _ in layers}
    live = {n: v.detach().clone().requires_grad_(n in names) for n, v in params.items()}
    handles = [mods[p].register_forward_hook(hook(p)) for p, _, _ in layers]
    was_training = model.net.training
    model.net.eval()
    try:
        for xb in x.split(CHUNK):
            f = model.output(live, xb)
            L = loss_hessian_sqrt(model.likelihood, f.detach(), noise)
            targets = [outs[p] for p, _, _ in layers]
            for k in range(L.shape[-1]):
                grads = torch.autograd.grad(f, targets, grad_outputs=L[:, :, k], retain_graph=True)
                for (p, _, _), g in zip(layers, grads):
                    factors[p][0] = factors[p][0] + g.T @ g
            for p, _, b in layers:
                a = acts[p]
                if b is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
                factors[p][1] = factors[p][1] + a.T @ a
    finally:
        for h in handles:
            h.remove()
        model.net.train(was_training)
    n = x.shape[0]
    return {p: (G.detach(), A.detach() / n) for p, (G, A) in factors.items()}
