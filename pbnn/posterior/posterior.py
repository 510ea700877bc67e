"""``pbnn.Posterior``: what every backend returns.

Example:
    >>> import torch, pbnn
    >>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
    >>> model = pbnn.BNN(torch.nn.Linear(1, 1), likelihood=pbnn.likelihoods.Gaussian(0.1))
    >>> post = pbnn.fit(model, x, y, method="map", num_steps=300, progress=False)
    >>> post.samples["weight"].shape        # [chain, draw, *shape]
    torch.Size([1, 1, 1, 1])
    >>> post.predict(x).mean.shape
    torch.Size([20])
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pbnn.core.data import Data, check_inputs
from pbnn.core.model import BNN
from pbnn.engine.distributed import rng_devices
from pbnn.engine.optim import atomic_save
from pbnn.posterior import arviz_io, serialization
from pbnn.posterior.approx import Approximation, LazyDraws
from pbnn.posterior.predictive import (
    BUDGET,
    Prediction,
    StreamedPrediction,
    activations_per_point,
    predict_bn_refresh,
    predict_bnn,
    predict_params,
    predict_pyro,
)

__all__ = ["Posterior"]


class Posterior:
    """Posterior draws of a model's latent sites, whatever backend produced them.

    Attributes:
        model: the :class:`pbnn.BNN` or hand-written Pyro model that was fitted.
        samples: ``{site: tensor [chain, draw, *shape]}`` in the constrained space. A posterior
            built from :class:`pbnn.approx.LazyDraws` (SVI, Laplace, SWAG: their fitted
            distribution and a seed, not the draws) makes them on first access and keeps them;
            ``predict`` never needs them all at once.
        sample_stats: ``{stat: tensor [chain, draw]}`` (may be empty).
        fixed: values of deterministic parameters (``pyro.param`` sites) after the fit.
        data: the training :class:`pbnn.data.Data` (for ArviZ's observed data and LOO).
        method: the backend's name.
        approximation: the fitted distribution, a :class:`pbnn.approx.Approximation` (draws,
            log density, mean, ``J Sigma J^T``), when the backend fitted one (SVI, Laplace,
            SWAG), so more draws can be made; else None.
        predictor: optional ``predictor(posterior, draws, x) -> Prediction`` for backends
            whose predictive is not "evaluate the model at each draw" (e.g. a linearised
            Laplace predictive). :meth:`save` stores it by the tag it is registered under
            (:func:`pbnn.posterior.serialization.register`), never pickled.
        info: backend-specific extras (loss traces, timings, ...).
    """

    def __init__(
        self,
        model,
        samples: dict[str, torch.Tensor] | LazyDraws,
        *,
        data: Data,
        method: str,
        sample_stats: dict[str, torch.Tensor] | None = None,
        fixed: dict[str, torch.Tensor] | None = None,
        approximation: Approximation | None = None,
        predictor: Callable[[Posterior, dict[str, torch.Tensor], torch.Tensor], Prediction] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self._lazy = samples if isinstance(samples, LazyDraws) else None
        if self._lazy is None:
            shapes = {tuple(v.shape[:2]) for v in samples.values()}
            if len(shapes) != 1:
                raise ValueError(f"all sites need the same [chain, draw] dims, got {shapes}")
        for name, v in (samples.get(0, 1) if self._lazy is not None else samples).items():
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"posterior draws of site {name!r} contain NaN or inf: the fit diverged; "
                    "lower the learning rate / step size or standardise the data"
                )
        self.model = model
        self._samples = None if self._lazy is not None else {k: v.detach() for k, v in samples.items()}
        self.sample_stats = dict(sample_stats or {})
        self.fixed = {k: v.detach() for k, v in (fixed or {}).items()}
        self.data = data
        self.method = method
        self.approximation = approximation
        self.predictor = predictor
        self.info = dict(info or {})

    # ------------------------------------------------------------------ shape
    @property
    def samples(self) -> dict[str, torch.Tensor]:
        if self._samples is None:  # drawn from the approximation on first access, then kept
            self._samples = self._lazy.materialise()
        return self._samples

    @samples.setter
    def samples(self, value: dict[str, torch.Tensor]) -> None:
        self._samples, self._lazy = dict(value), None

    @property
    def lazy_draws(self) -> LazyDraws | None:
        """How the draws are made on demand (None when they are stored)."""
        return self._lazy

    @property
    def num_chains(self) -> int:
        if self._samples is None:
            return self._lazy.num_chains
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        if self._samples is None:
            return self._lazy.num_draws
        return next(iter(self.samples.values())).shape[1]

    def flat_samples(self) -> dict[str, torch.Tensor]:
        """Draws with chains concatenated: ``{site: [chain * draw, *shape]}``."""
        return {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in self.samples.items()}

    def _draws(self, num_samples: int | None, seed: int | None) -> tuple[int, Callable]:
        """``(S, draws)``: ``draws(start, stop)`` gives flat draws ``start:stop`` of the ``S`` used.

        Fewer than the posterior's draws: evenly spaced stored draws, or the first draws of each
        chain when they are made on demand (independent draws: only their blocks are drawn);
        more are drawn from the approximation as :class:`LazyDraws` with ``seed``.
        Draws are kept in memory while they are small (``S * D <= BUDGET``)."""
        total = self.num_chains * self.num_draws
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        num = total if num_samples is None else num_samples
        if num > total:
            if self.approximation is None:
                raise ValueError(
                    f"asked for {num_samples} draws but this {self.method!r} posterior holds {total} and "
                    "cannot make more; pass num_samples <= that"
                )
            if seed is None:
                seed = int(torch.randint(2**62, ()))
            idx, take = torch.arange(num), LazyDraws(self.approximation, num, seed).take
        else:
            if num == total:
                idx = torch.arange(total)
            elif self._lazy is not None:  # independent draws made on demand: the first of each chain
                lazy, chains = self._lazy, self._lazy.num_chains
                firsts = [c * lazy.num_draws + torch.arange(num // chains + (c < num % chains)) for c in range(chains)]
                idx = torch.cat(firsts)
            else:  # stored draws (Markov chains): evenly spaced, over all chains
                idx = torch.linspace(0, total - 1, num).round().long()
            if self._samples is not None:
                flat = self.flat_samples()
                return num, lambda a, b: {k: v[idx[a:b]] for k, v in flat.items()}
            take = self._lazy.take
        dim = self.approximation.layout.dim if self.approximation is not None else BUDGET
        if num * dim <= BUDGET:
            cached = take(idx)
            return num, lambda a, b: {k: v[a:b] for k, v in cached.items()}
        return num, lambda a, b: take(idx[a:b])

    # ------------------------------------------------------------------ predictive
    def predict(self, x, num_samples: int | None = None, *, seed: int | None = 0) -> Prediction:
        """Posterior predictive at ``x``.

        Args:
            x: inputs ``[M, ...]``.
            num_samples: number of draws to use (default: all the posterior's draws). Fewer
                are taken evenly spaced (draws made on demand: the first of each chain); more
                are drawn fresh when the posterior keeps a fitted distribution (SVI, Laplace, SWAG).
            seed: seed for fresh draws.

        Returns a :class:`pbnn.predictive.StreamedPrediction` (for a BNN, a Pyro model and the
        BatchNorm-refresh predictor): the network runs over blocks of draws and points whose
        size keeps about ``BUDGET`` (2**24) numbers in memory, so its summaries (mean,
        variances, entropies, ``log_prob``, ``interval``) never hold ``[S, N, out]``; its
        ``samples`` / ``conditional`` are built when asked for. Other predictors (Laplace's
        linearised one) get all draws at once.

        Raises:
            ValueError: when the rows of ``x`` do not have the shape of the training inputs
                (e.g. a different number of features, or 1-D ``x`` for a one-feature model:
                pass ``x[:, None]``), or ``x`` holds NaN / inf.
        """
        train = self.data.head()[0] if hasattr(self.data, "head") else None  # a loader: its first batch
        x = check_inputs(x, train if isinstance(train, torch.Tensor) else None)
        num, draws = self._draws(num_samples, seed)
        streams = self.predictor in (None, predict_params, predict_bn_refresh)
        if not streams:  # e.g. Laplace's linearised predictive: its own closed forms
            return self.predictor(self, draws(0, num), x)
        if not isinstance(self.model, BNN):
            return self._streamed(lambda w, xb: predict_pyro(self.model, w, self.fixed, xb), draws, num, x, 1024)
        per_point = activations_per_point(self.model.net, x)
        if self.predictor is predict_bn_refresh:  # a refresh per draw over the training data: all points at once
            return self._streamed(lambda w, xb: predict_bn_refresh(self, w, xb), draws, num, x, per_point)
        points = max(1, min(len(x), 4096, BUDGET // per_point))
        predictor = self.predictor

        def evaluate(w, xb):
            if predictor is predict_params:
                return predict_params(self, w, xb)
            return predict_bnn(self.model, w, self.fixed, xb, chunk_size=max(1, BUDGET // (len(xb) * per_point)))

        chunk = max(1, BUDGET // (points * per_point))
        return StreamedPrediction(
            evaluate, draws, num, x, draw_chunk=chunk, point_chunk=points, quantile_points=self._qpoints(num, len(x))
        )

    def _qpoints(self, num: int, n: int) -> int:
        """Points per block of the quantile pass: ``[draws, points]`` float64 temporaries within BUDGET / 8."""
        return max(1, min(n, BUDGET // 8 // num))

    def _streamed(self, evaluate, draws, num, x, per_point) -> StreamedPrediction:
        """Streamed over draws only (all points per call): Pyro models, BatchNorm refresh."""
        chunk = max(1, BUDGET // (max(1, len(x)) * per_point))
        return StreamedPrediction(evaluate, draws, num, x, draw_chunk=chunk, point_chunk=max(1, len(x)))

    def log_likelihood(self) -> torch.Tensor:
        """Pointwise log-likelihood of the training data, ``[chain, draw, N]`` (computed once, then cached)."""
        return arviz_io.training_log_likelihood(self)

    def log_marginal_likelihood(self) -> float:
        """The backend's estimate of ``log p(y | x)`` for model comparison (e.g. Laplace's)."""
        value = self.info.get("log_marginal_likelihood")
        if value is None:
            raise ValueError(
                f"this {self.method!r} posterior has no marginal-likelihood estimate; fit with "
                "method='laplace' (and a Gaussian prior) to get one"
            )
        return float(value)

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(self, x_new=None, y_new=None, *, seed: int = 0):
        """ArviZ ``InferenceData``: posterior, sample_stats, log_likelihood, posterior_predictive,
        observed_data, constant_data; with ``x_new`` also predictions (draws of ``y`` at
        ``x_new``) and predictions_constant_data (``x_new``, and ``y_new`` if given). ``seed``
        seeds the draws of ``y``. Groups, dimension names and chain layout:
        :mod:`pbnn.posterior.arviz_io`."""
        return arviz_io.to_inference_data(self, x_new, y_new, seed=seed)

    @classmethod
    def from_pyro(cls, source, model=None, x=None, y=None, *, num_samples: int = 1000, seed: int | None = 0):
        """A Posterior of a finished ``pyro.infer.MCMC`` run or a fitted Pyro autoguide
        (:func:`pbnn.posterior.pyro_io.from_pyro`)."""
        from pbnn.posterior.pyro_io import from_pyro

        return from_pyro(source, model, x, y, num_samples=num_samples, seed=seed)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Save the posterior to ``path`` (format: :mod:`pbnn.posterior.serialization`).

        The file holds tensors and plain data only: draws, stats, fitted parameters, the data,
        ``info`` (entries that are not plain data are left out and named in
        ``info["save_warning"]``), the approximation and predictor as a type tag plus tensors,
        a description of the model (site names and shapes) and, in a separate byte field,
        the pickled model when it pickles (read only by ``Posterior.load(..., trusted=True)``).
        Written atomically: a temporary file in the same folder, fsynced, then renamed over
        ``path``, so a killed save leaves the previous file.
        """
        info, left_out = {}, []
        for k, v in self.info.items():
            if k == "save_warning":
                continue
            try:
                info[k] = serialization.to_plain(v)
            except TypeError:
                left_out.append(str(k))
        warnings = []
        if left_out:
            warnings.append(f"info entries {left_out} not saved (not plain data)")
        try:
            model_bytes = serialization.to_bytes_tensor(serialization.pickled(self.model))
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # e.g. a lambda or closure model
            model_bytes = None
            warnings.append(f"model not saved ({e}); pass model= to Posterior.load")
        if warnings:
            self.info["save_warning"] = "; ".join(warnings)
            info["save_warning"] = self.info["save_warning"]
        payload = {
            # draws made on demand are stored as their recipe (seed, counts), not as tensors
            "samples": self._samples if self._lazy is None else {},
            "draws": None if self._lazy is None else self._lazy.state(),
            "sample_stats": serialization.to_plain(self.sample_stats),
            "fixed": self.fixed,
            "x": self.data.x,
            "y": self.data.y,
            "method": self.method,
            "approximation": serialization.encode("approximation", self.approximation),
            "predictor": serialization.encode("predictor", self.predictor),
            "info": info,
            "model": {"signature": _model_signature(self.model), "pickle": model_bytes},
        }
        atomic_save(serialization.dump(payload), path)

    @classmethod
    def load(cls, path: str | Path, model=None, map_location=None, trusted: bool = False) -> Posterior:
        """Load a Posterior saved by :meth:`save`.

        Args:
            path: the file.
            model: the model the posterior was fitted with (a :class:`pbnn.BNN` or Pyro model
                function), checked against the file: a BNN's parameter names and shapes,
                likelihood and prior types; a Pyro model's latent site names and shapes on the
                saved data. Required unless ``trusted=True``.
            map_location: as ``torch.load``'s (e.g. ``"cpu"``).
            trusted: unpickle the model stored in the file when ``model`` is None, and read
                files of older pbnn versions (pickles). Unpickling runs code from the file:
                only for files you trust.

        Everything else is read with ``torch.load(weights_only=True)`` after the file's
        checksum is verified: a damaged or changed file is a ValueError, and no content of
        the file runs code unless ``trusted=True``.
        """
        name = os.fspath(path)
        with open(path, "rb") as f:
            try:
                state = serialization.read(f, name, map_location)
            except serialization.NotThisFormat:
                if not trusted:
                    raise ValueError(
                        f"{name!r} is not a posterior file of this pbnn's format: an older pbnn's file "
                        "(read only by unpickling, which runs code from the file), a damaged file or "
                        "another file. If you trust it, load it with pbnn.Posterior.load(path, "
                        "trusted=True) and save it again to convert it"
                    ) from None
                f.seek(0)
                return cls._load_pickle(f, model, map_location)
        stored = state["model"]
        if model is None:
            if not trusted:
                raise ValueError(
                    "pass model= (the network or Pyro model this posterior was fitted with; it is checked "
                    "against the file), or trusted=True to unpickle the model stored in the file (this "
                    "runs code from the file: only for files you trust)"
                )
            if stored["pickle"] is None:
                raise ValueError("this file holds no model (it was not picklable when saved); pass model=")
            model = serialization.unpickle(stored["pickle"], map_location)
        approximation = serialization.decode("approximation", state["approximation"])
        _check_model(model, stored["signature"], state, approximation)
        return cls._from_state(model, state, approximation, serialization.decode("predictor", state["predictor"]))

    @classmethod
    def _load_pickle(cls, f, model, map_location) -> Posterior:
        """A file of pbnn before the checked format: a pickle (``trusted=True`` only)."""
        state = torch.load(f, weights_only=False, map_location=map_location)
        model = model if model is not None else state["model"]
        if model is None:
            raise ValueError("this file holds no model (it was not picklable); pass model= to Posterior.load")
        return cls._from_state(model, state, state["approximation"], state.get("predictor"))

    @classmethod
    def _from_state(cls, model, state: dict, approximation, predictor) -> Posterior:
        """A Posterior from a loaded file's fields (both formats), with its decoded extras."""
        draws = state.get("draws")  # files of version 2 with draws made on demand
        return cls(
            model,
            state["samples"] if draws is None else LazyDraws(approximation, **draws),
            data=Data(state["x"], state["y"]),
            method=state["method"],
            sample_stats=state["sample_stats"],
            fixed=state["fixed"],
            approximation=approximation,
            predictor=predictor,
            info=state["info"],
        )

    def __repr__(self) -> str:
        shapes = [s for _, s, _ in self._lazy.approximation.layout.sites] if self._samples is None else None
        shapes = shapes or [v.shape[2:] for v in self.samples.values()]
        sites, size = len(shapes), sum(math.prod(s) for s in shapes)
        return (
            f"Posterior(method={self.method!r}, chains={self.num_chains}, draws={self.num_draws}, "
            f"sites={sites}, dims={size})"
        )


# Predictors of the posterior layer that files may name (pbnn.infer.laplace registers its own).
serialization.register("predictor", "params")(predict_params)
serialization.register("predictor", "bn_refresh")(predict_bn_refresh)


def _model_signature(model) -> dict:
    """What :meth:`Posterior.load` checks a ``model=`` against (plain data)."""
    if isinstance(model, BNN):
        return {
            "kind": "bnn",
            "parameters": {n: list(p.shape) for n, p in model.net.named_parameters()},
            "likelihood": type(model.likelihood).__qualname__,
            "prior": type(model.prior).__qualname__,
        }
    return {"kind": "pyro"}


def _check_model(model, signature: dict, state: dict, approximation=None) -> None:
    """ValueError naming how ``model`` differs from the one the file was saved with."""
    fix = "pass the model the posterior was fitted with"
    mine = _model_signature(model)
    if mine["kind"] != signature["kind"]:
        what = {"bnn": "a pbnn.BNN", "pyro": "a Pyro model function"}
        raise ValueError(f"model= is {what[mine['kind']]}, the file was saved from {what[signature['kind']]}; {fix}")
    if mine["kind"] == "bnn":
        differs = [
            f"{k}: file {signature[k]!r}, model= {mine[k]!r}"
            for k in ("parameters", "likelihood", "prior")
            if signature.get(k) != mine[k]
        ]
        if differs:
            raise ValueError(f"model= does not match the file ({'; '.join(differs)}); {fix}")
        return
    import pyro
    import pyro.poutine as poutine

    latent = {k: tuple(v.shape[2:]) for k, v in state["samples"].items()}
    if state.get("draws") is not None:  # draws made on demand: the approximation's sites
        latent = {n: tuple(shape) for n, shape, _ in approximation.layout.sites}
    try:
        with torch.random.fork_rng(devices=rng_devices()), pyro.get_param_store().scope(), torch.no_grad():
            trace = poutine.trace(model).get_trace(state["x"], state["y"])
    except Exception as e:
        raise ValueError(f"model= does not run on the file's data ({type(e).__name__}: {e}); {fix}") from None
    sites = {
        n: tuple(site["value"].shape)
        for n, site in trace.nodes.items()
        # pyro.param sites too: an ensemble stores one value per member among its draws
        if site["type"] == "param" or site["type"] == "sample" and not site["is_observed"]
    }
    differs = [f"{n}: file {s}, model= {sites.get(n, 'absent')}" for n, s in latent.items() if sites.get(n) != s]
    if differs:
        raise ValueError(f"model= does not match the file's sites ({'; '.join(differs)}); {fix}")
