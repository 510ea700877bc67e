"""MC dropout and DropConnect (Gal and Ghahramani, ICML 2016; Wan et al. 2013).

pbnn trains the MAP objective of the BNN with dropout on the input of every dropout target
layer and the log prior of that layer's weight multiplied by ``p_keep`` (the KL of dropout
variational inference). Draws are explicit weights: the trained weight times a Bernoulli mask
over ``p_keep`` on its input columns (MC dropout) or elements (DropConnect), drawn from a
generator seeded with ``info["mask_seed"]``, so ``predict``, ArviZ and ``save``/``load`` work as
for any backend. Targets, weight decay and BatchNorm: ``docs/imitation.md``.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-2, 2, 40)[:, None]; y = torch.sin(x[:, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> post = pbnn.fit(pbnn.BNN(net), x, y, method="mc-dropout", p=0.2, num_steps=200, num_samples=50,
    ...                 progress=False, seed=0)
    >>> post.samples["2.weight"].shape, post.info["targets"]
    (torch.Size([1, 50, 1, 8]), ['2.weight'])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pbnn.core.likelihoods import Gaussian
from pbnn.core.model import BNN
from pbnn.core.options import option, optional, positive_int
from pbnn.core.potential import Potential
from pbnn.core.priors import Normal
from pbnn.engine.optim import decay, fit_points, initial_points, map_log_joint
from pbnn.infer.base import Backend, OptimOptions, RunOptions, register
from pbnn.posterior.posterior import Posterior

__all__ = ["MCDropout", "DropConnect", "dropout_targets", "weight_decay"]

DEFAULT_P = 0.01


def dropout_targets(net: nn.Module, p: float | None) -> dict[str, tuple[nn.Linear, float]]:
    """The linear layers whose inputs are dropped, with their drop rates: ``{weight name: (layer, p)}``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> {k: v[1] for k, v in dropout_targets(net, 0.1).items()}
        {'2.weight': 0.1, '4.weight': 0.1}
    """
    own = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    targets: dict[str, tuple[nn.Linear, float]] = {}
    if own:
        for name, drop in own:
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            kids = list(parent.named_children()) if isinstance(parent, nn.Sequential) else []
            pos = [k for k, _ in kids].index(child) if kids else -1
            nxt = kids[pos + 1] if 0 <= pos < len(kids) - 1 else None
            if nxt is None or not isinstance(nxt[1], nn.Linear):
                raise ValueError(
                    f"dropout layer {name!r} is not directly followed by an nn.Linear in an nn.Sequential; pbnn "
                    "represents MC dropout masks as weight draws of that linear layer. Move the dropout in front "
                    "of a linear layer, or remove the net's dropout layers and let pbnn insert them"
                )
            prefix = f"{parent_name}.{nxt[0]}" if parent_name else nxt[0]
            targets[prefix + ".weight"] = (nxt[1], drop.p if p is None else p)
        return targets
    rate = DEFAULT_P if p is None else p
    first = next(m for m in net.modules() if any(True for _ in m.parameters(recurse=False)))
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear) and m is not first:
            targets[(name + "." if name else "") + "weight"] = (m, rate)
    if not targets:
        raise ValueError(
            "MC dropout needs a hidden layer: it drops the inputs of every nn.Linear after the first, "
            "and this net has none"
        )
    return targets


def weight_decay(model: BNN, targets: dict[str, float], n: int, tau: float) -> dict[str, float]:
    """Gal and Ghahramani's weight decay per weight tensor, ``p_keep l^2 / (2 N tau)``.

    ``targets`` maps the dropout target weights to their drop rate ``p``; other Bayesian
    tensors get ``l^2 / (2 N tau)`` (no dropout in front). ``l^2 = 1 / prior_scale^2``
    (a :class:`pbnn.priors.Normal` prior); ``tau = 1 / sigma^2`` the noise precision.
    These are the coefficients of ``||W||^2`` in the objective written per datum in
    squared-error units, ``(1/N) sum_i (y_i - f_i)^2 / 2 + sum_W lambda_W ||W||^2``.

    Example:
        >>> import torch, pbnn
        >>> m = pbnn.BNN(torch.nn.Linear(1, 1), prior=pbnn.priors.Normal(0.0, 2.0))
        >>> weight_decay(m, {"weight": 0.5}, n=10, tau=4.0)
        {'weight': 0.0015625, 'bias': 0.003125}
    """
    if not isinstance(model.prior, Normal):
        raise ValueError("the weight-decay formula needs a pbnn.priors.Normal prior")
    l2 = 1.0 / float(model.prior.scale) ** 2
    return {name: (1.0 - targets.get(name, 0.0)) * l2 / (2 * n * tau) for name in model.bayesian_names}


def _rate(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"dropout rate {name} must lie in (0, 1), got {p!r}")
    return float(p)


@register("mc-dropout")
@dataclass(frozen=True, kw_only=True)
class MCDropout(Backend, RunOptions, OptimOptions):
    """MC dropout: train with dropout and the prior's weight decay, keep dropout on at prediction.

    Args:
        p: drop rate (default: the net's own dropout rates, or 0.01 where pbnn inserts
            dropout); when given it overrides the net's rates.
        num_samples: dropout masks (weight draws) stored in the Posterior.
        num_steps, lr, batch_size: training, as :class:`pbnn.infer.MAP` (Adam, learning
            rate decaying 10x; the gradient per data point clipped at norm 10).
        others: as in ``OptimOptions`` and ``RunOptions`` (with ``accumulate``, every
            micro-batch draws its dropout masks from the same RNG state).

    Example:
        >>> import pbnn
        >>> pbnn.infer.MCDropout(p=0.05).p
        0.05
    """

    model_kinds = ("bnn",)
    _connect = False
    p: float | None = option(None, optional(_rate))
    num_samples: int = option(100, positive_int)

    def run(self, potential: Potential) -> Posterior:
        model = potential.model
        targets = dropout_targets(model.net, self.p)
        bad = [k for k in targets if k not in model.bayesian_names]
        if bad:
            raise ValueError(
                f"the dropout target weights {bad} are deterministic; dropout masks are weight draws, so these "
                "layers must be Bayesian (see BNN's bayesian= / last_layer=)"
            )
        rates = {k: p for k, (_, p) in targets.items()}
        prior_weights = {k: 1.0 - p for k, p in rates.items()}
        transform = self._connect_transform(rates) if self._connect else None

        def log_joint(z, idx, fixed, w):
            return map_log_joint(potential, z, idx, fixed, prior_weights=prior_weights, transform=transform)

        with self._training_dropout(model, targets):
            z, fixed = initial_points(potential, [None])
            z, fixed, losses = fit_points(
                potential,
                z,
                fixed,
                num_steps=self.num_steps,
                lr=decay(self.lr, self.num_steps),
                log_joint=log_joint,
                desc=f"{type(self).__name__} (p={sorted(set(rates.values()))})",
                **self.optim_args(len(potential)),
            )
            mask_seed = int(torch.randint(0, 2**62, ()).item())
        values = potential.layout.constrain(z[0])
        samples = self._draws(values, rates, mask_seed)
        info = {"losses": losses, "targets": list(rates), "p": rates, "mask_seed": mask_seed}
        if isinstance(model.prior, Normal) and isinstance(model.likelihood, Gaussian):
            sigma = values["sigma"] if model.likelihood.learned else model.likelihood.scale
            info["weight_decay"] = weight_decay(model, rates, len(potential), 1.0 / float(sigma) ** 2)
        return self.posterior(potential, samples, fixed={k: v[0] for k, v in fixed.items()}, info=info)

    # ------------------------------------------------------------------ masks
    def _mask(self, weight: torch.Tensor, p: float, num: int, gen: torch.Generator) -> torch.Tensor:
        """``num`` masks already scaled by ``1 / p_keep``: on input columns (dropout) or elements (DropConnect)."""
        shape = (num,) + (tuple(weight.shape) if self._connect else (1, weight.shape[1]))
        keep = torch.full(shape, 1.0 - p, dtype=weight.dtype, device=weight.device)
        return torch.bernoulli(keep, generator=gen) / (1.0 - p)

    def _draws(self, values: dict[str, torch.Tensor], rates: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator(next(iter(values.values())).device).manual_seed(seed)
        s = self.num_samples
        out = {}
        for name, v in values.items():
            v = v.expand((s,) + v.shape)
            if name in rates:
                v = v * self._mask(v[0], rates[name], s, gen)
            out[name] = v[None].clone()
        return out

    def _connect_transform(self, rates: dict[str, float]):
        def transform(sample):
            out = dict(sample)
            for name, p in rates.items():
                w = sample[name]
                out[name] = w * torch.bernoulli(torch.full_like(w, 1.0 - p)) / (1.0 - p)
            return out

        return transform

    @contextlib.contextmanager
    def _training_dropout(self, model: BNN, targets: dict[str, tuple[nn.Linear, float]]):
        """During training: the net's own dropout layers off, pbnn's dropout on the targets' inputs."""
        own = [m for m in model.net.modules() if isinstance(m, nn.Dropout)]
        modes = [m.training for m in own]
        handles = []
        for m in own:
            m.eval()
        if not self._connect:
            for layer, p in targets.values():
                handles.append(layer.register_forward_pre_hook(_input_dropout(p)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, mode in zip(own, modes):
                m.train(mode)


def _input_dropout(p: float):
    def hook(module, args):
        return (F.dropout(args[0], p, training=True),) + tuple(args[1:])

    return hook


@register("dropconnect")
@dataclass(frozen=True, kw_only=True)
class DropConnect(MCDropout):
    """DropConnect: Bernoulli masks on the individual weights of the target layers.

    Same options and targets as :class:`MCDropout`; during training one weight mask is
    drawn per step (shared by the minibatch), and each stored draw is the trained weight
    times its own mask over ``p_keep``.

    Example:
        >>> import pbnn
        >>> pbnn.infer.DropConnect(p=0.2).name
        'dropconnect'
    """

    _connect = True
