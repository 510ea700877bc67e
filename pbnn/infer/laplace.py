"""Laplace approximation: a Gaussian at the MAP whose precision is the curvature there. As in
laplace-torch, the weight ``subset``, the curvature ``hessian`` and the ``predictive`` are
independent choices.

Example:
    >>> import torch, pbnn
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 1, generator=g); y = 2 * x[:, 0] + 0.1 * torch.randn(40, generator=g)
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="laplace", map_steps=300, progress=False, seed=0)
    >>> post.samples["weight"].shape, round(float(post.predict(x).mean[0] / x[0, 0]), 1)
    (torch.Size([1, 1000, 1, 1]), 2.0)
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from pbnn.core import likelihoods as _lik
from pbnn.core.data import LoaderData
from pbnn.core.model import eval_mode
from pbnn.core.options import one_of, option, optional, positive, positive_int
from pbnn.core.potential import Potential, SiteLayout
from pbnn.engine.optim import fit_map, resolve_batch_size
from pbnn.infer.base import Backend, RunOptions, register
from pbnn.infer.curvature import (
    CHUNK,
    check_likelihood,
    feature_jacobian,
    final_layer_features,
    ggn_diag,
    ggn_full,
    kfac_factors,
    kfac_layers,
    output_jacobian,
    weight_layout,
)
from pbnn.posterior import serialization
from pbnn.posterior.approx import Approximation, FlatApproximation, KroneckerApproximation, LazyDraws
from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import Prediction, has_batchnorm, predict_bn_refresh, predict_bnn

__all__ = ["Laplace", "LaplacePredictor", "GLMPrediction", "FULL_HESSIAN_LIMIT", "DENSE_LIMIT"]

HESSIANS = ("full", "ggn", "diag", "kfac")
SUBSETS = ("auto", "all", "last_layer")
PREDICTIVES = ("glm", "nn")
STRUCTURES = ("scalar", "layerwise")
# hessian="full" takes D reverse passes and a dense D x D inverse: refused above this D.
FULL_HESSIAN_LIMIT = 1000
# hessian="ggn" stores a dense D x D matrix (and Cholesky-factors it): refused above this D.
DENSE_LIMIT = 5000


def _prior_precision_option(name: str, value):
    if isinstance(value, str):
        if value not in ("marglik", "prior"):
            raise ValueError(f"{name} must be 'marglik', 'prior' or a positive number, got {value!r}")
        return value
    return positive(name, value)


@register("laplace")
@dataclass(frozen=True, kw_only=True)
class Laplace(Backend, RunOptions):
    """Laplace approximation at the MAP with GGN / KFAC / diagonal / exact-Hessian curvature.

    Args:
        hessian: ``"ggn"`` (default: full generalised Gauss-Newton, positive semi-definite by
            construction, D <= 5000), ``"diag"``, ``"kfac"`` (``nn.Linear`` and ``nn.Conv2d`` layers) or
            ``"full"`` (the exact Hessian of the negative log joint, ``torch.func.hessian`` of the
            model's potential, D <= 1000; often not positive definite for BNNs).
        subset: ``"auto"`` (default: ``"last_layer"`` for a classification likelihood, ``"all"``
            otherwise), ``"all"`` Bayesian weights or ``"last_layer"`` (the last module with
            parameters). Why ``"auto"``: all-weights Laplace at an interpolating classifier is
            underconfident, while all weights give regression the better in-between uncertainty
            (measurements in ``docs/laplace.md``).
        prior_precision: ``"marglik"`` (default: tuned by maximising the Laplace log marginal
            likelihood), ``"prior"`` (the model's own Gaussian prior) or a positive number.
        prior_structure: for ``"marglik"``: one precision (``"scalar"``) or one per layer
            (``"layerwise"``; a layer's weight and bias share it).
        predictive: ``"glm"`` (default, as Laplace Redux recommends: linearised network,
            probit for classification) or ``"nn"`` (run the network at weight draws).
        on_indefinite: for ``hessian="full"``, what to do when the Hessian is not positive
            definite: ``"ggn"`` (warn and use the GGN) or ``"raise"`` (ValueError).
        map_steps, lr, batch_size: Adam steps, learning rate and minibatch size of the MAP fit
            (:func:`pbnn.engine.optim.fit_map`, as :class:`pbnn.infer.MAP`).
        refine: polish a full-batch MAP with L-BFGS so the gradient is ~0 there, as the Laplace
            expansion assumes.
        num_samples: weight draws stored in the Posterior (more can be made).

    Example:
        >>> import pbnn
        >>> pbnn.infer.Laplace(hessian="kfac", subset="last_layer").hessian
        'kfac'
    """

    hessian: str = option("ggn", one_of(*HESSIANS))
    subset: str = option("auto", one_of(*SUBSETS))
    prior_precision: str | float = option("marglik", _prior_precision_option)
    prior_structure: str = option("scalar", one_of(*STRUCTURES))
    predictive: str = option("glm", one_of(*PREDICTIVES))
    on_indefinite: str = option("ggn", one_of("ggn", "raise"))
    map_steps: int = option(3000, positive_int)
    lr: float = option(0.01, positive)
    batch_size: int | None = option(None, optional(positive_int))
    refine: bool = True
    num_samples: int = option(1000, positive_int)

    def run(self, potential: Potential) -> Posterior:
        if potential.kind != "bnn":
            return self._run_joint(potential)
        model = potential.network(self.name)
        if self.hessian != "full" or self.predictive == "glm":
            check_likelihood(model.likelihood)
        if self.predictive == "glm" and model.likelihood.output_shape:
            raise ValueError(
                f"predictive='glm' needs a network output [N, D]; this one has extra dimensions "
                f"[N, {str(model.likelihood.output_shape)[1:-1]}]: use predictive='nn'"
            )
        subset, names = self._subset_names(model)
        self._check_dim(sum(size for n, size in zip(potential.names, potential.sizes) if n in names))
        z, fixed_det, losses = self._fit_map(potential)
        values = potential.layout.constrain(z)
        layout = weight_layout(values, names)  # the Gaussian's z: the subset's weights
        theta = layout.join(values).detach().double()
        prior_mean, model_prec = _gaussian_prior(model, values, layout)
        curv, hessian, note = self._curvature(potential, z, fixed_det, layout, model_prec)
        labels, index = self._groups(layout)
        index = index.to(theta.device)
        log_lik = float(
            _sum(model.log_likelihood(values, x, y, fixed_det).sum() for x, y in potential.data.full_pass())
        )
        dev2 = (theta - prior_mean) ** 2 if prior_mean is not None else None
        prec, lml_fn = self._prior_precision(curv, layout, index, theta, dev2, model_prec, log_lik)
        approx = _approximation(curv, prec, theta, layout, values)
        lml = float(lml_fn(prec))
        draws = LazyDraws.from_rng(approx, self.num_samples)  # drawn on demand, not stored
        info = {
            "losses": losses,
            "hessian": hessian,
            "subset": subset,
            "predictive": self.predictive,
            "prior_precision": {g: float(prec[(index == i).nonzero()[0, 0]]) for i, g in enumerate(labels)},
            "log_marginal_likelihood": lml,
        }
        if note:
            info["indefinite"] = note
        rest = {k: v.detach() for k, v in values.items() if k not in names}
        for n, start in zip(layout.names, itertools.accumulate([0, *layout.sizes])):
            h = n + getattr(model.prior, "suffix", "")
            if h in model.hyper_names:  # a hierarchical prior's scale: the one its precision implies
                rest[h] = prec[start].rsqrt().to(rest[h])
        return self.posterior(
            potential,
            draws,
            fixed={**fixed_det, **rest},
            approximation=approx,
            predictor=LaplacePredictor(self.predictive, names, {n: values[n].detach() for n in names}),
            info=info,
        )

    # ------------------------------------------------------------------ any log joint
    def _run_joint(self, potential: Potential) -> Posterior:
        """Laplace on a hand-written Pyro model: a Gaussian over every latent site in the unconstrained
        ``z``, at the maximum of the unconstrained log density (log joint plus log Jacobian) with the
        exact Hessian there as precision, as Pyro's ``AutoLaplaceApproximation`` defines it. The
        model's own prior is part of the Hessian; the predictive runs the model at draws."""
        bad = {
            "hessian": (self.hessian, ("ggn", "full")),  # "ggn" is the default: no network here, so "full"
            "predictive": (self.predictive, ("glm", "nn")),  # likewise "glm": the sampled predictive
            "subset": (self.subset, ("auto", "all")),
        }
        for opt, (value, ok) in bad.items():
            if value not in ok:
                raise ValueError(
                    f"{opt}={value!r} needs a pbnn.BNN (a network to differentiate); Laplace on a hand-written "
                    "Pyro model uses the exact Hessian of the log joint over all latent sites (hessian='full', "
                    "predictive='nn', subset='all')"
                )
        if not isinstance(self.prior_precision, str):
            raise ValueError(
                "prior_precision as a number needs a pbnn.BNN with a Gaussian prior; a hand-written Pyro model's "
                "own prior is part of the exact Hessian (leave prior_precision at its default)"
            )
        if potential.dim > FULL_HESSIAN_LIMIT:
            raise ValueError(
                f"Laplace on a hand-written Pyro model takes the exact {potential.dim} x {potential.dim} Hessian; "
                f"it is limited to D <= {FULL_HESSIAN_LIMIT} latent numbers. Use method='svi' or 'map', or a pbnn.BNN "
                "(whose Laplace has GGN, diagonal and KFAC curvature)"
            )
        batch = resolve_batch_size(self.batch_size, len(potential))
        potential.require(self.name, minibatch=batch is not None)
        z, fixed, losses = fit_map(
            potential,
            num_steps=self.map_steps,
            lr=self.lr,
            batch_size=batch,
            jacobian=True,
            desc="Laplace: MAP",
            progress=self.progress,
        )
        if self.refine and batch is None:
            params = [z.requires_grad_(True), *(v.requires_grad_(True) for v in fixed.values())]
            _lbfgs_polish(params, lambda: -potential.log_joint(z, None, fixed, jacobian=True))
        z, fixed = z.detach(), {k: v.detach() for k, v in fixed.items()}
        # torch.autograd's Hessian (one reverse pass per row): Pyro's tracing does not run under vmap
        H = torch.autograd.functional.hessian(lambda zz: -potential.log_joint(zz, None, fixed, jacobian=True), z)
        H = H.double()
        H = (H + H.mT) / 2  # float32 round-off asymmetry
        eig, vec = torch.linalg.eigh(H)
        info = {"losses": losses, "hessian": "full", "subset": "all", "predictive": "nn"}
        if not bool((eig > 0).all()):
            n_bad = int((eig <= 0).sum())
            note = (
                f"the Hessian of the negative log density at the mode is not positive definite: {n_bad} of "
                f"{len(eig)} eigenvalues are <= 0 (smallest {float(eig.min()):.3g}), so it is no Gaussian's "
                "precision; more map_steps may help if the mode has not converged"
            )
            if self.on_indefinite == "raise":
                raise ValueError(note + "; or on_indefinite='ggn' for the documented fallback")
            # No network to linearise (no GGN): use |eigenvalues| (the "saddle-free" Hessian of
            # Dauphin et al. 2014), floored so that no direction has an unbounded variance.
            warnings.warn(
                note + ". Using the Hessian with its eigenvalues replaced by their absolute values.", stacklevel=4
            )
            eig = eig.abs().clamp_min(1e-6 * float(eig.abs().max()))
            info["hessian"], info["indefinite"] = "full (|eigenvalues|)", note
        # Sigma = V diag(1 / eig) V^T (float64, from the one eigendecomposition)
        scale_tril = torch.linalg.cholesky((vec * eig.reciprocal()) @ vec.mT)
        dtype = z.dtype
        q = MultivariateNormal(z.double().to(dtype), scale_tril=scale_tril.to(dtype))
        approx = FlatApproximation(q, potential.layout)
        with torch.no_grad():
            log_p = float(potential.log_joint(z, None, fixed, jacobian=True))
        # log p(y) ~ log p(y, z*) + D/2 log 2 pi - 1/2 log det H, on the unconstrained density
        info["log_marginal_likelihood"] = (
            log_p + 0.5 * potential.dim * math.log(2 * math.pi) - 0.5 * float(eig.log().sum())
        )
        draws = approx.sample(self.num_samples)
        return self.posterior(
            potential,
            {k: v.detach().unsqueeze(0) for k, v in draws.items()},
            fixed=fixed,
            approximation=approx,
            info=info,
        )

    # ------------------------------------------------------------------ pieces
    def _subset_names(self, model) -> tuple[str, list[str]]:
        """The resolved subset (``"auto"`` decided) and the names of its Bayesian weights."""
        last = [m for m in model.net.modules() if any(True for _ in m.parameters(recurse=False))][-1]
        ids = {id(p) for p in last.parameters(recurse=False)}
        last_names = [n for n, p in model.net.named_parameters() if id(p) in ids and n in model.bayesian_names]
        subset = self.subset
        if subset == "auto":
            subset = "last_layer" if model.likelihood.is_classification and last_names else "all"
        if subset == "all":
            return subset, list(model.bayesian_names)
        if not last_names:
            raise ValueError("subset='last_layer': the model's last layer has no Bayesian parameters; use subset='all'")
        return subset, last_names

    def _check_dim(self, dim: int) -> None:
        if self.hessian == "full" and dim > FULL_HESSIAN_LIMIT:
            raise ValueError(
                f"hessian='full' needs {dim} reverse passes and a dense {dim} x {dim} inverse; it is limited to "
                f"D <= {FULL_HESSIAN_LIMIT} weights. Use hessian='ggn' (D <= {DENSE_LIMIT}), 'diag' or 'kfac', "
                "or subset='last_layer'"
            )
        if self.hessian == "ggn" and dim > DENSE_LIMIT:
            raise ValueError(
                f"hessian='ggn' stores a dense {dim} x {dim} matrix; it is limited to D <= {DENSE_LIMIT} weights. "
                "Use hessian='diag' or 'kfac', or subset='last_layer'"
            )

    def _fit_map(self, potential: Potential):
        """The MAP (:func:`fit_map`: Adam, no Jacobian, as pbnn's MAP), then an optional L-BFGS polish."""
        batch = resolve_batch_size(self.batch_size, len(potential))
        # A hierarchical prior's joint MAP does not exist: the density grows without bound as a
        # prior scale -> 0 with its weights, and Adam / L-BFGS collapse the network or overflow
        # (issue 29). Its scales stay at their start (the prior median); the prior precision is
        # then what marglik tunes, i.e. the scales are fitted by the evidence instead.
        hyper = potential.model.hyper_names
        held = torch.cat([torch.full((n,), k in hyper) for k, n in zip(potential.names, potential.sizes)])
        z, fixed, losses = fit_map(
            potential,
            num_steps=self.map_steps,
            lr=self.lr,
            batch_size=batch,
            moving=~held if hyper else None,
            desc="Laplace: MAP",
            progress=self.progress,
        )
        if self.refine and batch is None and not isinstance(potential.data, LoaderData):  # a loader: no full batch
            params = [z.requires_grad_(True), *(v.requires_grad_(True) for v in fixed.values())]
            hook = z.register_hook(lambda g: g.masked_fill(held, 0.0)) if hyper else None
            _lbfgs_polish(params, lambda: -potential.log_joint(z, None, fixed, jacobian=False))
            if hook is not None:
                hook.remove()
        return z.detach(), {k: v.detach() for k, v in fixed.items()}, losses

    def _curvature(self, potential: Potential, z: torch.Tensor, fixed: dict, layout: SiteLayout, model_prec):
        """The log-likelihood curvature ``(kind, object)`` and the Hessian kind actually used.

        ``("dense", H [D, D])``, ``("diag", h [D])`` (float64) or ``("kfac", KroneckerApproximation)``
        (its prior precision set later)."""
        model, names, values = potential.model, layout.names, potential.layout.constrain(z)
        noise = {n: values[n] for n in model.noise_sites(potential.out_dim)}
        params = {**fixed, **{n: values[n] for n in model.bayesian_names}}
        hessian, note = self.hessian, None
        if hessian == "full":
            if model_prec is None:
                raise ValueError(_NON_GAUSSIAN_PRIOR)
            H = _exact_hessian(potential, z, fixed, layout).double()
            _, info = torch.linalg.cholesky_ex(H)
            if int(info) == 0:  # it includes the model's prior; keep the likelihood part
                return ("dense", H - torch.diag(model_prec)), hessian, None
            eig = torch.linalg.eigvalsh(H)
            n_bad = int((eig <= 0).sum())
            note = (
                f"the Hessian of the negative log joint at the MAP is not positive definite: {n_bad} of {len(eig)} "
                f"eigenvalues are <= 0 (smallest {float(eig.min()):.3g}), so it is no Gaussian's precision. "
                "Fix: hessian='ggn' (the generalised Gauss-Newton, positive semi-definite by construction), "
                "or more map_steps if the MAP has not converged"
            )
            if self.on_indefinite == "raise":
                raise ValueError(note + "; or on_indefinite='ggn' to fall back automatically")
            warnings.warn(note + ". Falling back to hessian='ggn'.", stacklevel=4)
            hessian = "ggn"
        rows = potential.data.full_pass()  # a loader: summed over one pass of its batches
        if hessian == "ggn":
            return ("dense", _sum(ggn_full(model, names, params, x, noise) for x, _ in rows)), hessian, note
        if hessian == "diag":
            return ("diag", _sum(ggn_diag(model, names, params, x, noise) for x, _ in rows)), hessian, note
        layers = kfac_layers(model, names)
        factors = _kfac_over(rows, lambda x: kfac_factors(model, names, params, x, noise))
        kron = KroneckerApproximation(layers, {n: values[n] for n in names}, factors, {p: 1.0 for p, _, _ in layers})
        return ("kfac", kron), hessian, note

    def _groups(self, layout: SiteLayout) -> tuple[list[str], torch.Tensor]:
        """The prior-precision groups (``"scalar"``: one; else per layer) and each flat weight's group."""
        layer_of = [n.rsplit(".", 1)[0] if "." in n else "" for n in layout.names]
        labels = list(dict.fromkeys(layer_of)) if self.prior_structure == "layerwise" else ["all"]
        gid = [labels.index(lay) if self.prior_structure == "layerwise" else 0 for lay in layer_of]
        return labels, torch.cat([torch.full((s,), g, dtype=torch.long) for s, g in zip(layout.sizes, gid)])

    def _prior_precision(self, curv, layout, index, theta, dev2, model_prec, log_lik):
        """The prior precision per flat weight, and ``lml(prec)``, the Laplace log marginal likelihood."""
        kind, obj = curv
        eig = []

        def logdet(prec: torch.Tensor) -> torch.Tensor:
            if kind == "dense" and bool((prec == prec[0]).all()):
                # One scalar precision d: log det(H + d I) = sum log(lambda_i + d) from ONE
                # eigendecomposition, instead of a D^3 Cholesky (and its backward) per L-BFGS
                # evaluation (minutes per fit at D ~ 4000, e.g. the digits MLP).
                if not eig:
                    eig.append(torch.linalg.eigvalsh(obj.detach()))
                shifted = eig[0] + prec[0]
                return (
                    shifted.log().sum()
                    if bool((shifted > 0).all())
                    else torch.tensor(math.inf, dtype=prec.dtype, device=prec.device)
                )
            if kind == "dense":
                L, info = torch.linalg.cholesky_ex(obj + torch.diag(prec))
                return (
                    2 * L.diagonal().log().sum()
                    if int(info) == 0
                    else torch.tensor(math.inf, dtype=prec.dtype, device=prec.device)
                )
            if kind == "diag":
                return (obj + prec).log().sum()
            return obj.logdet_precision(_layer_deltas(prec, layout, obj.layers))

        def lml(prec: torch.Tensor) -> torch.Tensor:
            # log p(D | theta*) + log N(theta*; mu, P^-1) + D/2 log 2 pi - 1/2 log det(H + P)
            return log_lik - 0.5 * (prec * dev2).sum() + 0.5 * prec.log().sum() - 0.5 * logdet(prec)

        if dev2 is None:
            raise ValueError(_NON_GAUSSIAN_PRIOR)
        if self.prior_precision == "prior":
            prec = model_prec
        elif self.prior_precision == "marglik":
            init = torch.zeros(int(index.max()) + 1, dtype=torch.double, device=index.device)
            if model_prec is not None:  # start from the model's prior (group means)
                init = torch.stack([model_prec[index == g].mean().log() for g in range(len(init))])
            log_d = init.clone().requires_grad_(True)  # L-BFGS: few parameters, smooth
            _lbfgs([log_d], lambda: -lml(log_d.clamp(-20, 20).exp()[index]), **_MARGLIK_LBFGS)
            prec = log_d.detach().exp()[index]
            if not torch.isfinite(lml(prec)):
                raise ValueError(
                    "marglik tuning left the posterior precision not positive definite (the exact Hessian's "
                    "likelihood part is indefinite); use hessian='ggn' or a fixed prior_precision"
                )
        else:
            prec = torch.full_like(theta, float(self.prior_precision))
        if kind == "kfac":
            _layer_deltas(prec, layout, obj.layers, check=True)
        return prec.detach(), lml


_MARGLIK_LBFGS = {"max_iter": 200, "tolerance_grad": 1e-9, "tolerance_change": 1e-14}
_NON_GAUSSIAN_PRIOR = (
    "Laplace needs a Gaussian prior on the weights (pbnn.priors.Normal, LayerwiseNormal or HierarchicalNormal) "
    "to add its precision to the curvature"
)


def _sum(terms):
    """Sum of the terms (one term: itself, so tensor data gives the numbers of one pass)."""
    total = None
    for t in terms:
        total = t if total is None else total + t
    return total


def _kfac_over(rows, factors_of) -> dict:
    """KFAC factors over batches: ``G`` summed, ``A`` (a mean over rows) weighted by batch size."""
    first, total, n, count = None, {}, 0, 0
    for x, _ in rows:
        f, m = factors_of(x), x.shape[0]
        first, n, count = first or f, n + m, count + 1
        total = {p: (G + total[p][0], A * m + total[p][1]) if total else (G, A * m) for p, (G, A) in f.items()}
    return first if count == 1 else {p: (G, A / n) for p, (G, A) in total.items()}


def _layer_deltas(prec: torch.Tensor, layout: SiteLayout, layers, check: bool = False) -> dict:
    """Each KFAC layer's prior precision (of its first weight: a layer's sites are contiguous in ``z``);
    with ``check``, raise unless it is the same for the whole layer."""
    ends = dict(zip(layout.names, itertools.accumulate(layout.sizes)))
    starts = {n: e - size for (n, e), size in zip(ends.items(), layout.sizes)}
    deltas = {}
    for p, w, b in layers:
        block = prec[starts[w] : ends[b or w]]
        if check and not torch.allclose(block, block[0].expand_as(block)):
            raise ValueError(
                f"hessian='kfac' needs one prior precision per layer, but layer {p!r} has several (e.g. a "
                "LayerwiseNormal prior with a different bias scale); use prior_precision='marglik' or a number, "
                "or hessian='diag' / 'ggn'"
            )
        deltas[p] = prec[starts[w]]
    return deltas


def _gaussian_prior(model, values: dict, layout: SiteLayout):
    """Flat prior mean and precision of the subset weights (at the MAP hyper-parameters), or (None, None)."""
    dists = model.prior_distributions(values)
    means, precs = {}, {}
    for n, shape in zip(layout.names, layout.shapes):
        d = dists[n]
        while isinstance(d, Independent):
            d = d.base_dist
        if not isinstance(d, Normal):
            return None, None
        means[n], precs[n] = d.loc.expand(shape), d.scale.expand(shape).pow(-2)
    return layout.join(means).detach().double(), layout.join(precs).detach().double()


def _lbfgs(params: list[torch.Tensor], loss_fn, **options) -> None:
    """Minimise ``loss_fn()`` over ``params`` in place with L-BFGS (strong Wolfe line search)."""
    opt = torch.optim.LBFGS(params, lr=1.0, line_search_fn="strong_wolfe", **options)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def _lbfgs_polish(params: list[torch.Tensor], loss_fn) -> None:
    """Full-batch L-BFGS from the Adam solution; kept only if it lowers the loss and stays finite."""
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        start = float(loss_fn())
    try:
        _lbfgs(params, loss_fn, max_iter=100, history_size=20)
        with torch.no_grad():
            end = float(loss_fn())
    except ValueError:  # a line search into NaN / inf parameters (a distribution rejects them)
        end = math.nan
    with torch.no_grad():
        if not (math.isfinite(end) and end <= start):
            for p, b in zip(params, before):
                p.copy_(b)


def _exact_hessian(potential: Potential, z: torch.Tensor, fixed: dict, layout: SiteLayout) -> torch.Tensor:
    """Hessian of ``-log joint`` (no Jacobian) in the weights of ``layout``, the other sites of ``z`` held."""
    parts = potential.layout.split(z.detach())

    def loss(theta):
        z_all = potential.layout.join({**parts, **layout.split(theta)})
        return -potential.log_joint(z_all, None, fixed, jacobian=False)

    # reverse-over-reverse: torch.func.hessian's forward-over-reverse fails on a BNN with a learned
    # noise scale ("expected m1 and m2 to have the same dtype", torch 2.13)
    return torch.func.jacrev(torch.func.jacrev(loss))(layout.join(parts)).detach()


def _approximation(curv, prec: torch.Tensor, theta: torch.Tensor, layout: SiteLayout, values: dict) -> Approximation:
    kind, obj = curv
    dtype = values[layout.names[0]].dtype
    if kind == "dense":
        P = obj + torch.diag(prec)
        # MultivariateNormal factorises P's upper triangle; mirroring it changes no number but lets
        # the exact Hessian's float32 round-off asymmetry pass its symmetry check.
        q = MultivariateNormal(theta, precision_matrix=P.triu() + P.triu(1).mT)
        return FlatApproximation(MultivariateNormal(theta.to(dtype), scale_tril=q.scale_tril.to(dtype)), layout)
    if kind == "diag":
        return FlatApproximation(Independent(Normal(theta.to(dtype), (obj + prec).rsqrt().to(dtype)), 1), layout)
    obj.set_prior_precision({p: float(d) for p, d in _layer_deltas(prec, layout, obj.layers).items()})
    return obj


# ----------------------------------------------------------------------------- predictive
@serialization.register("predictor", "laplace")
class LaplacePredictor:
    """The Posterior's predictor for Laplace: linearised (``"glm"``) or sampled-network (``"nn"``).

    Switch after fitting with ``post.predictor.predictive = "nn"``.

    Example:
        >>> from pbnn.infer.laplace import LaplacePredictor
        >>> LaplacePredictor("glm", ["weight"], {}).predictive
        'glm'
    """

    def __init__(self, predictive: str, names: list[str], mean: dict[str, torch.Tensor]) -> None:
        if predictive not in PREDICTIVES:
            raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}")
        self.predictive = predictive
        self.names = list(names)
        self.mean = dict(mean)

    def state(self) -> dict:
        """Tensors and plain data for a posterior file (:mod:`pbnn.posterior.serialization`)."""
        return {"predictive": self.predictive, "names": self.names, "mean": self.mean}

    @classmethod
    def from_state(cls, state: dict) -> LaplacePredictor:
        return cls(state["predictive"], state["names"], state["mean"])

    def __call__(self, post: Posterior, draws: dict[str, torch.Tensor], x: torch.Tensor) -> Prediction:
        model = post.model
        S = draws[self.names[0]].shape[0]
        det = {n: post.fixed[n] for n in model.deterministic_names}
        if self.predictive == "nn":
            full = {k: v.expand((S,) + tuple(v.shape)) for k, v in post.fixed.items() if k not in det}
            full.update(draws)
            if has_batchnorm(model.net):  # each weight draw gets its own BatchNorm statistics
                return predict_bn_refresh(post, full, x)
            return predict_bnn(model, full, det, x)
        # frozen parameters are not in either dict: the network's own values are used
        params = {n: self.mean.get(n, post.fixed.get(n)) for n in model.bayesian_names + model.deterministic_names}
        approx = post.approximation
        feats = final_layer_features(model, self.names, params, x)
        if feats is not None:  # a last layer: its features suffice, no [N, C, D] Jacobian for KFAC
            phi, f_mu = feats
            F = _last_layer_covariance(model, approx, self.names, params, phi).to(f_mu.dtype)
            f_s = f_mu + _last_layer_outputs({n: draws[n] - self.mean[n] for n in self.names}, phi)
        else:
            with torch.no_grad(), eval_mode(model.net):
                f_mu = model.output(params, x)
            J = output_jacobian(model, self.names, params, x).detach()
            F = approx.functional_covariance(J).to(f_mu.dtype)
            # Draws of the linearised network f_mu + J (theta_s - theta*): the per-draw view (ArviZ, LOO).
            dtheta = approx.layout.join({n: draws[n] - self.mean[n] for n in self.names})
            f_s = f_mu + torch.einsum("mcd,sd->smc", J, dtheta)
        noise = {n: post.fixed[n] for n in model.noise_sites(f_mu.shape[-1])}
        noise_s = {k: v.expand((S,) + tuple(v.shape)) for k, v in noise.items()}
        return GLMPrediction(f_s, model.likelihood.conditional(f_s, noise_s), f_mu, F, model.likelihood, noise)


def _last_layer_outputs(delta: dict[str, torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
    """``phi dW_s^T + db_s`` ``[S, N, C]``: a final Linear's output change for weight changes ``delta``."""
    out = 0.0
    for v in delta.values():
        out = out + (torch.einsum("scj,nj->snc", v, phi) if v.dim() == 3 else v[:, None, :])
    return out


def _last_layer_covariance(model, approx, names, params, phi: torch.Tensor) -> torch.Tensor:
    """``J Sigma J^T`` ``[N, C, C]`` of a final Linear from its features ``phi``.

    KFAC in closed form: with ``Sigma`` diagonal ``1 / lam`` in the eigenbasis ``Q_G kron Q_A``,
    ``F_n = Q_G diag(sum_i (Q_A^T a_n)_i^2 / lam_oi) Q_G^T`` (``a_n = [phi_n, 1]``): ``O(N C K)``, no
    ``[N, C, D]`` Jacobian. Other curvatures: the Jacobian built from the features, in chunks.
    """
    if isinstance(approx, KroneckerApproximation):
        ((p, _, b),) = approx.layers
        _, qg, _, qa = approx.eig[p]
        a = phi.double()
        if b is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        weight = (a @ qa).pow(2) @ (1.0 / approx._eigenvalues(p)).T  # [N, out]
        return torch.einsum("co,no,do->ncd", qg, weight, qg)
    return torch.cat(
        [approx.functional_covariance(feature_jacobian(model, names, params, chunk)) for chunk in phi.split(CHUNK)]
    )


class GLMPrediction(Prediction):
    """The linearised-network (GLM) predictive of a Laplace posterior, ``f(x) ~ N(f_mu, J Sigma J^T)``:
    closed form ``N(f_mu, F + sigma^2)`` for regression, the probit approximation (on centred
    logits, see ``_probit_var``) for classification; per-draw quantities from draws of the
    linearised network.

    Example:
        >>> import torch, pbnn
        >>> from pbnn.infer.laplace import GLMPrediction
        >>> lik = pbnn.likelihoods.Gaussian(0.5)
        >>> f = torch.zeros(1, 3, 1)
        >>> p = GLMPrediction(f, lik.conditional(f, {}), f[0], torch.ones(3, 1, 1), lik, {})
        >>> p.variance          # 1 (linearised weights) + 0.25 (noise)
        tensor([1.2500, 1.2500, 1.2500])
    """

    def __init__(self, samples, conditional, f_mean, f_cov, likelihood, noise) -> None:
        super().__init__(samples, conditional)
        self.f_mean = f_mean
        self.f_cov = f_cov
        self.f_var = f_cov.diagonal(dim1=-2, dim2=-1)
        self.likelihood = likelihood
        self.noise = noise
        self.probit_var = self._probit_var()  # mean, variance, entropy and log_prob all use it

    def _sq(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., 0] if t.shape[-1] == 1 else t

    def _noise_var(self) -> torch.Tensor:
        if isinstance(self.likelihood, _lik.MultiTaskGaussian):
            s = self.noise["sigma"]
        else:
            s = self.noise["sigma"] if self.likelihood.learned else self.likelihood.scale
        return (s**2).expand(self.f_mean.shape[-1:]).expand_as(self.f_mean)

    def _probit_var(self) -> torch.Tensor:
        """The logit variances the probit scales by.

        Softmax ignores a shift of all logits (``softmax(f + c 1) = softmax(f)``), so only the
        centred logits ``P f`` (``P = I - 1 1^T / C``) matter, and dropping the common-mode part
        of ``F`` is exact. Without it, the shared variance (e.g. of a last-layer bias direction)
        inflated each logit's variance and the per-logit probit flattened the probabilities.
        """
        if not isinstance(self.likelihood, _lik.Categorical):
            return self.f_var
        C = self.f_cov.shape[-1]
        P = torch.eye(C, dtype=self.f_cov.dtype, device=self.f_cov.device) - 1.0 / C
        return (P @ self.f_cov @ P).diagonal(dim1=-2, dim2=-1)

    def _probit_probs(self) -> torch.Tensor:
        kappa = (1 + math.pi / 8 * self.probit_var).rsqrt()
        if isinstance(self.likelihood, _lik.Bernoulli):
            return torch.sigmoid(kappa * self.f_mean)[..., 0]
        return torch.softmax(kappa * self.f_mean, -1)

    def _marginal(self) -> Normal:
        return Normal(self._sq(self.f_mean), self._sq(self.f_var + self._noise_var()).sqrt())

    @property
    def mean(self) -> torch.Tensor:
        return self._probit_probs() if self.is_classification else self._sq(self.f_mean)

    @property
    def epistemic_variance(self) -> torch.Tensor:
        return super().epistemic_variance if self.is_classification else self._sq(self.f_var)

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        return super().aleatoric_variance if self.is_classification else self._sq(self._noise_var())

    @property
    def variance(self) -> torch.Tensor:
        if self.is_classification:
            p = self._probit_probs()
            return p * (1 - p)
        return self.epistemic_variance + self.aleatoric_variance

    @property
    def entropy(self) -> torch.Tensor:
        if not self.is_classification:
            raise AttributeError("entropy is defined for classification likelihoods only")
        p = self._probit_probs()
        if isinstance(self.likelihood, _lik.Bernoulli):
            p = torch.stack([1 - p, p], -1)
        return self._entropy(p)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Closed-form (regression) or probit (classification) log predictive density, ``[N]``."""
        y = torch.as_tensor(y, device=self.f_mean.device)
        if isinstance(self.likelihood, _lik.Bernoulli):
            p = self._probit_probs().clamp(1e-12, 1 - 1e-12)
            y = y.to(p.dtype)
            return y * p.log() + (1 - y) * (1 - p).log()
        if isinstance(self.likelihood, _lik.Categorical):
            return self._probit_probs().clamp_min(1e-12).log().gather(-1, y.long()[:, None])[:, 0]
        y = y.to(self.f_mean.dtype)
        if self.f_mean.shape[-1] == 1:
            return self._marginal().log_prob(y.reshape(-1))
        cov = self.f_cov + torch.diag_embed(self._noise_var())
        return MultivariateNormal(self.f_mean, covariance_matrix=cov).log_prob(y)

    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        return self._marginal().cdf(torch.as_tensor(y, dtype=self.f_mean.dtype, device=self.f_mean.device))

    def quantile(self, q: float) -> torch.Tensor:
        if self.is_classification:
            raise ValueError("quantile is defined for regression; for classification use interval()")
        return self._marginal().icdf(torch.as_tensor(q, dtype=self.f_mean.dtype, device=self.f_mean.device))
