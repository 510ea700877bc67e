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
from pbnn.core.model import eval_mode
from pbnn.core.potential import SiteLayout

__all__ = [
    "loss_hessian_sqrt",
    "output_jacobian",
    "ggn_full",
    "ggn_diag",
    "kfac_factors",
    "kfac_layers",
    "linear_layers",
    "final_layer_features",
    "feature_jacobian",
]

SUPPORTED_LIKELIHOODS = (_lik.Gaussian, _lik.MultiTaskGaussian, _lik.Bernoulli, _lik.Categorical)
CHUNK = 256  # data points per Jacobian / KFAC pass: bounds memory at CHUNK * outputs * D


def check_likelihood(likelihood) -> None:
    if not isinstance(likelihood, SUPPORTED_LIKELIHOODS):
        raise ValueError(
            f"GGN curvature supports Gaussian, MultiTaskGaussian, Bernoulli and Categorical likelihoods, "
            f"got {type(likelihood).__name__}; use hessian='full' (exact Hessian, small nets) or method='svi'"
        )
    if likelihood.output_shape and not isinstance(likelihood, _lik.Gaussian):
        dims = ", ".join(map(str, likelihood.output_shape))
        raise ValueError(
            f"GGN curvature supports outputs with extra dimensions (here [N, {dims}]) for the Gaussian likelihood "
            f"only, not {type(likelihood).__name__}; use hessian='full' (small nets) or method='svi'"
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


def final_layer_features(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor):
    """``(phi [N, in], f [N, C])`` when ``names`` are the weight (and bias) of an ``nn.Linear`` whose
    output is the network's output (a last-layer subset); else None.

    Then ``f = phi W^T + b``: the Jacobian in the layer's weights is ``phi`` itself, so last-layer
    curvature and predictives need the features only, computed once per chunk of points under
    ``no_grad`` (no Jacobian of the feature extractor, memory proportional to the last layer).

    Example:
        >>> import torch, pbnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> model = pbnn.BNN(net, last_layer=True)
        >>> phi, f = final_layer_features(model, model.bayesian_names, model.parameter_values(), torch.ones(4, 2))
        >>> phi.shape, torch.allclose(phi, net[:2](torch.ones(4, 2)))
        (torch.Size([4, 3]), True)
    """
    owners = {n: prefix for prefix, mod in model.net.named_modules() for n in _own_names(prefix, mod)}
    prefixes = {owners.get(n) for n in names}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    mod = dict(model.net.named_modules())[prefix]
    if not isinstance(mod, nn.Linear) or sorted(names) != sorted(_own_names(prefix, mod)):
        return None
    seen = []
    handle = mod.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    phis, fs = [], []
    try:
        with torch.no_grad(), eval_mode(model.net):
            for xb in x.split(CHUNK):
                seen.clear()
                f = model.output(params, xb)
                if (
                    len(seen) != 1
                    or seen[0][0].dim() != 2
                    or seen[0][1].shape != f.shape
                    or not torch.equal(seen[0][1], f)
                ):
                    return None  # the layer runs more than once, or something follows it
                phis.append(seen[0][0])
                fs.append(f)
    finally:
        handle.remove()
    return torch.cat(phis), torch.cat(fs)


def _own_names(prefix: str, mod: nn.Module) -> list[str]:
    return [f"{prefix}.{p}" if prefix else p for p, _ in mod.named_parameters(recurse=False)]


def feature_jacobian(model, names: list[str], params: dict[str, torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
    """The output Jacobian ``[N, C, D]`` of a final ``nn.Linear`` from its input features ``phi``.

    Example:
        >>> import torch, pbnn
        >>> model = pbnn.BNN(torch.nn.Linear(2, 3))
        >>> feature_jacobian(model, ["weight", "bias"], model.parameter_values(), torch.ones(5, 2)).shape
        torch.Size([5, 3, 9])
    """
    layout = weight_layout(params, names)
    n, c = phi.shape[0], params[names[0]].shape[0]
    eye = torch.eye(c, dtype=phi.dtype, device=phi.device)
    parts = {}
    for name in names:
        if params[name].dim() == 2:  # weight [C, in]: d f_c / d W_{c', j} = [c == c'] phi_j
            parts[name] = eye[None, :, :, None] * phi[:, None, None, :]
        else:  # bias [C]
            parts[name] = eye.expand(n, c, c)
    return layout.join(parts)


def output_jacobian(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d f(x_n) / d theta`` for the parameters ``names``, ``[N, C, D]``.

    ``params`` holds every network parameter's value; ``torch.func.jacrev`` is vmapped over
    data points (so the cost is one reverse pass per output per point, batched). For a final
    ``nn.Linear`` (:func:`final_layer_features`) it is built from the layer's input features.
    """
    feats = final_layer_features(model, names, params, x)
    if feats is not None:
        return feature_jacobian(model, names, params, feats[0])
    layout = weight_layout(params, names)
    theta = layout.join(params)

    def f_one(th, x1):
        return model.output({**params, **layout.split(th)}, x1[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))
    with eval_mode(model.net):
        return torch.cat([jac(theta, xb) for xb in x.split(CHUNK)], 0)


def _scaled_jacobians(model, names, params, x, noise):
    """Yield ``L_n^T J_n`` ``[B, C, D]`` per chunk of data: the GGN is the sum of their squares."""
    for xb in x.split(CHUNK):
        feats = final_layer_features(model, names, params, xb)
        if feats is not None:  # a last layer: features once, no Jacobian of the feature extractor
            J, f = feature_jacobian(model, names, params, feats[0]), feats[1]
        else:
            J = output_jacobian(model, names, params, xb)
            with torch.no_grad(), eval_mode(model.net):
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
    """Diagonal of the GGN, ``[D]``, in float64 (exactly ``ggn_full(...).diagonal()``).

    For a final ``nn.Linear`` in closed form from its features: ``sum_n Lambda_n[c, c] phi_nj^2``
    for ``W_cj`` and ``sum_n Lambda_n[c, c]`` for ``b_c``."""
    feats = final_layer_features(model, names, params, x)
    if feats is not None:
        phi, f = (t.double() for t in feats)
        lam = loss_hessian_sqrt(model.likelihood, f, noise).double().pow(2).sum(-1)  # diag of L L^T, [N, C]
        parts = {n: lam.T @ phi.pow(2) if params[n].dim() == 2 else lam.sum(0) for n in names}
        return weight_layout(params, names).join(parts)
    g = None
    for LJ in _scaled_jacobians(model, names, params, x, noise):
        part = LJ.double().pow(2).sum((0, 1))
        g = part if g is None else g + part
    return g


# ----------------------------------------------------------------------------- KFAC
KFAC_LAYERS = (nn.Linear, nn.Conv2d)


def kfac_layers(model, names: list[str]) -> list[tuple[str, str, str | None]]:
    """``(module prefix, weight name, bias name or None)`` for every layer owning ``names``.

    KFAC needs each parameter in ``names`` to be the weight or bias of an ``nn.Linear`` or an
    ``nn.Conv2d`` (``groups=1``, zero padding), with weight and bias in ``names`` together.
    """
    owners = {}
    for prefix, mod in model.net.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{prefix}.{pname}" if prefix else pname] = (prefix, mod)
    layers, seen = [], set()
    for n in names:
        prefix, mod = owners[n]
        if not isinstance(mod, KFAC_LAYERS):
            raise ValueError(
                f"hessian='kfac' supports nn.Linear and nn.Conv2d layers only; parameter {n!r} belongs to a "
                f"{type(mod).__name__}; use hessian='diag' or 'ggn', or subset='last_layer'"
            )
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
            raise ValueError(
                f"hessian='kfac' supports nn.Conv2d with groups=1 and padding_mode='zeros'; layer {prefix!r} has "
                f"groups={mod.groups}, padding_mode={mod.padding_mode!r}; use hessian='diag'"
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


linear_layers = kfac_layers  # the name before Conv2d support


def _patches(mod: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as ``[B, T, K]``: ``T`` locations (conv positions, tokens) of ``K`` features
    each, in the order of the flattened weight's columns."""
    if isinstance(mod, nn.Conv2d):
        cols = nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # [B, K, T]
        return cols.transpose(1, 2)
    return inp.reshape(inp.shape[0], -1, inp.shape[-1])


def _locations(out: torch.Tensor, conv: bool) -> torch.Tensor:
    """An output (or its gradient) as ``[B, T, out]``, locations matching :func:`_patches`."""
    if conv:
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def kfac_factors(model, names: list[str], params: dict[str, torch.Tensor], x: torch.Tensor, noise: dict) -> dict:
    """Kronecker factors ``{prefix: (G [out, out], A [K+1, K+1])}`` of the GGN per Linear / Conv2d layer.

    With ``a_{n,t}`` the layer's input at location ``t`` (a Conv2d's unfolded patch, a token of a
    Linear on ``[N, T, in]``, the one row of a Linear on ``[N, in]``) with a trailing 1 (the bias)
    and ``g_{n,t,k} = B_{n,t}^T L_n[:, k]`` (``B`` the Jacobian of the output in the layer's
    pre-activation at ``t``), the GGN block of the layer's flattened ``[W | b]`` is
    ``sum_{n,k} (sum_t g_{n,t,k} kron a_{n,t}) (...)^T``. KFAC (KFC for convolutions, Grosse &
    Martens 2016, in the "expand" form of laplace-torch / ASDL) approximates it by ``G kron A``
    with ``G = sum_{n,t,k} g g^T`` and ``A = mean_{n,t} a a^T``. It is exact for one data point and
    one location, and whenever ``g g^T`` summed over ``k`` is the same for every point and location
    while distinct locations' ``g`` are orthogonal: e.g. the last layer with a Gaussian
    likelihood on every output (``B = I``, ``Lambda = I / sigma^2``), per pixel for a Conv2d.

    Example:
        >>> import torch, pbnn
        >>> model = pbnn.BNN(torch.nn.Linear(2, 1), likelihood=pbnn.likelihoods.Gaussian(0.5))
        >>> x = torch.randn(10, 2)
        >>> G, A = kfac_factors(model, ["weight", "bias"], model.parameter_values(), x, {})[""]
        >>> float(G), torch.allclose(A[:2, :2], x.T @ x / 10)   # G = N / sigma^2
        (40.0, True)
    """
    layers = kfac_layers(model, names)
    mods = dict(model.net.named_modules())
    acts: dict[str, list[torch.Tensor]] = {}
    outs: dict[str, list[torch.Tensor]] = {}

    def hook(prefix):
        def fn(mod, inp, out):
            if prefix in outs:
                raise ValueError(
                    f"hessian='kfac': layer {prefix!r} runs more than once per forward pass (shared weights); "
                    "use hessian='diag' or 'ggn'"
                )
            acts[prefix] = _patches(mod, inp[0].detach())
            outs[prefix] = out

        return fn

    factors = {p: [0.0, 0.0, 0] for p, _, _ in layers}  # G, A (sum), number of (point, location) pairs
    live = {n: v.detach().clone().requires_grad_(n in names) for n, v in params.items()}
    handles = [mods[p].register_forward_hook(hook(p)) for p, _, _ in layers]
    conv = {p: isinstance(mods[p], nn.Conv2d) for p, _, _ in layers}
    try:
        for xb in x.split(CHUNK):
            acts.clear()
            outs.clear()
            with eval_mode(model.net):
                f = model.output(live, xb)
            L = loss_hessian_sqrt(model.likelihood, f.detach(), noise)
            targets = [outs[p] for p, _, _ in layers]
            for k in range(L.shape[-1]):
                grads = torch.autograd.grad(f, targets, grad_outputs=L[..., k], retain_graph=True)
                for (p, _, _), g in zip(layers, grads):
                    g = _locations(g, conv[p]).flatten(0, 1)
                    factors[p][0] = factors[p][0] + g.T @ g
            for p, _, b in layers:
                a = acts[p].flatten(0, 1)
                if b is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                factors[p][1] = factors[p][1] + a.T @ a
                factors[p][2] += a.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {p: (G.detach(), A.detach() / count) for p, (G, A, count) in factors.items()}
