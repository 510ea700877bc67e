"""Benchmarks: every backend on the same offline tasks (generated ``gap``, ``friedman``,
``moons``; scikit-learn's bundled ``diabetes``, ``digits``), and the UCI regression protocol.

Example:
    >>> import numpy as np
    >>> from pbnn.apps.bench import regression_protocol
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 3)); y = X @ np.array([1.0, -1.0, 0.5]) + 0.1 * rng.normal(size=60)
    >>> res = regression_protocol(X, y, "map", n_splits=2, num_steps=200, progress=False)
    >>> sorted(res)
    ['loglik', 'loglik_se', 'rmse', 'rmse_se']
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import math
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from pbnn.api import fit
from pbnn.core import likelihoods
from pbnn.core.data import as_tensor
from pbnn.core.datasets import gap_regression
from pbnn.core.model import BNN
from pbnn.evaluation import metrics
from pbnn.evaluation.metrics import evaluate
from pbnn.infer import BACKENDS
from pbnn.infer.base import check_positive_int

__all__ = ["regression_protocol", "TASKS", "run_task", "run_jobs", "QUICK_OPTIONS", "DEFAULT_METHODS"]

# `pbnn bench` with no --methods: one backend per family (baseline; Laplace and VI; SG-MCMC;
# MC dropout, ensembles, SWAG), chosen so the full default run (5 tasks x 3 seeds) stays
# under 30 minutes on 2 CPU cores. Full-batch MCMC (nuts, hmc, mh) is left out: it does not
# scale to the digits net (3,760 weights); run it on the small tasks with --methods.
DEFAULT_METHODS = ("map", "svi", "laplace", "sghmc", "mc-dropout", "ensemble", "swag")

# Options that make any backend fast enough for a smoke test; each backend gets the ones
# its constructor accepts. A dict with a "*" key gives per-method values ("*": the others):
# the MAP pre-training of SWAG / FGE runs 500 steps (their num_steps counts it too).
QUICK_OPTIONS = {
    "num_steps": 1000,
    "map_steps": {"*": 1000, "swag": 500, "swa": 500, "multiswag": 500, "fge": 500},
    "num_samples": 50,
    "warmup": 50,
    "num_chains": 1,
    "num_members": 2,
    "max_tree_depth": 5,
    "progress": False,
}


def _options_for(method: str, options: dict) -> dict:
    """The subset of ``options`` that ``method``'s backend accepts."""
    if method not in BACKENDS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[method]
    accepted = inspect.signature(cls).parameters
    pick = lambda v: v.get(method, v["*"]) if isinstance(v, dict) and "*" in v else v  # noqa: E731
    return {k: pick(v) for k, v in options.items() if k in accepted}


def _mlp(inp: int, out: int, hidden: int = 50, act=torch.nn.ReLU, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inp, hidden), act(), torch.nn.Linear(hidden, out))


def _standardise(train: np.ndarray, *others: np.ndarray, axis: int | None = 0):
    """Standardise with the training statistics per column, or (``axis=None``) with one mean and
    standard deviation over all pixels (as torchvision's ``Normalize`` for MNIST).

    Per-pixel standardisation would divide nearly constant border pixels by a tiny standard
    deviation: a pixel that is 0 in all but a few training images becomes a rare input of
    size 30-90 on test images, where the prior (not the data) sets its weights, so every
    method that samples weights predicts noise there.
    """
    mu, sd = train.mean(axis), train.std(axis)
    sd = np.where(sd > 0, sd, 1.0)  # constant columns stay constant instead of NaN
    return [(a - mu) / sd for a in (train, *others)], mu, sd


def regression_protocol(
    X,
    y,
    method: str = "svi",
    n_splits: int = 20,
    seed: int = 0,
    *,
    hidden: int = 50,
    test_fraction: float = 0.1,
    prior=None,
    progress: bool = False,
    **options,
) -> dict:
    """The UCI regression protocol (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016).

    ``n_splits`` random ``90/10`` train/test splits; inputs and targets standardised with
    the training statistics; one hidden layer of ``hidden`` ReLU units with a learned
    Gaussian noise scale; test RMSE and test log-likelihood (mean log predictive density
    per point) reported in the ORIGINAL target units, as mean and standard error over splits.

    Args:
        X: inputs ``[N, D]`` (numpy array or anything ``np.asarray`` takes).
        y: targets ``[N]``.
        method: a pbnn method name; ``options`` are its constructor arguments.
        prior: the weight prior (default: ``pbnn.BNN``'s default).

    Returns:
        ``{"rmse", "rmse_se", "loglik", "loglik_se"}`` as floats.

    Raises:
        ValueError: NaN / inf rows in ``X`` or ``y`` (named), mismatched row counts, an unknown
            method, ``n_splits < 1``, ``test_fraction`` outside (0, 1), fewer than 2 training rows.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim == 1:
        X = X[:, None]
    # NaN / inf rows are named here, before standardising spreads a NaN to every row.
    as_tensor(X, "X")
    as_tensor(y, "y")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    check_positive_int("n_splits", n_splits)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = X.shape[0]
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_test < 2:
        raise ValueError(f"{n} rows leave {n - n_test} for training; the protocol needs at least 2")
    rng = np.random.default_rng(seed)
    rmses, lls = [], []
    opts = {**_options_for(method, {"progress": progress}), **options}
    for split in range(n_splits):
        perm = rng.permutation(n)
        test, train = perm[:n_test], perm[n_test:]
        (xtr, xte), _, _ = _standardise(X[train], X[test])
        (ytr, _), y_mu, y_sd = _standardise(y[train], y[test])
        y_sd = float(y_sd)
        model = BNN(_mlp(X.shape[1], 1, hidden, seed=seed + split), prior=prior)
        post = fit(
            model, torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr, dtype=torch.float32), method=method, **opts
        )
        pred = post.predict(torch.tensor(xte, dtype=torch.float32))
        y_test_std = torch.tensor((y[test] - y_mu) / y_sd, dtype=torch.float32)
        rmses.append(metrics.rmse(pred, y_test_std) * y_sd)
        # log p(y) = log p(y_std) - log(y_sd): the density in original units.
        lls.append(-metrics.nll(pred, y_test_std) - math.log(y_sd))
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"rmse": float(np.mean(rmses)), "rmse_se": se(rmses), "loglik": float(np.mean(lls)), "loglik_se": se(lls)}


# ----------------------------------------------------------------------------- tasks
def _friedman(seed: int, n_train: int = 400, n_test: int = 400):
    g = np.random.default_rng(seed)
    X = g.uniform(size=(n_train + n_test, 10))
    f = 10 * np.sin(np.pi * X[:, 0] * X[:, 1]) + 20 * (X[:, 2] - 0.5) ** 2 + 10 * X[:, 3] + 5 * X[:, 4]
    y = f + g.normal(size=len(f))
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _moons(seed: int, n_train: int = 300, n_test: int = 500, noise: float = 0.2):
    g = np.random.default_rng(seed)
    n = n_train + n_test
    label = g.integers(0, 2, n)
    t = g.uniform(0, np.pi, n)
    X = np.where(
        label[:, None] == 0, np.stack([np.cos(t), np.sin(t)], 1), np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    )
    X = X + noise * g.normal(size=X.shape)
    return X[:n_train], label[:n_train], X[n_train:], label[n_train:]


def _sklearn(loader: str, seed: int):
    try:
        from sklearn import datasets
    except ImportError as e:  # benchmark-only dependency
        raise ValueError(f"task needs scikit-learn (pip install scikit-learn): {e}") from None
    X, y = getattr(datasets, loader)(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    return X[perm[n_test:]], y[perm[n_test:]], X[perm[:n_test]], y[perm[:n_test]]


def _gap(seed: int):
    d = gap_regression(seed=seed)
    return d["x_train"].numpy(), d["y_train"].numpy(), d["x_test"].numpy(), d["y_test"].numpy()


# name -> (loader(seed) -> Xtr, ytr, Xte, yte, kind, net activation)
TASKS = {
    "gap": (_gap, "regression", torch.nn.Tanh),
    "friedman": (_friedman, "regression", torch.nn.ReLU),
    "diabetes": (lambda s: _sklearn("load_diabetes", s), "regression", torch.nn.ReLU),
    "moons": (_moons, "classification", torch.nn.Tanh),
    "digits": (lambda s: _sklearn("load_digits", s), "classification", torch.nn.ReLU),
}
# Tasks whose inputs are image pixels: standardised with one mean and std, not per pixel.
PIXEL_TASKS = ("digits",)
# Tasks whose data ship with scikit-learn (an optional, benchmark-only dependency).
SKLEARN_TASKS = ("diabetes", "digits")


# Columns of the benchmark table, taken from pbnn.evaluate.
TABLE_KEYS = {
    "regression": ("rmse", "nll", "coverage_90", "crps"),
    "classification": ("accuracy", "nll", "brier", "ece"),
}


def run_task(task: str, method: str, seed: int = 0, **options) -> dict:
    """Fit ``method`` on one split of ``task``; return its metrics and timings.

    Regression inputs and targets are standardised on the training split (metrics are in
    standardised units); classification inputs are standardised per column, except the
    pixels of ``PIXEL_TASKS`` (digits), which share one mean and standard deviation.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    loader, kind, act = TASKS[task]
    Xtr, ytr, Xte, yte = loader(seed)
    Xtr, Xte = np.asarray(Xtr, np.float64).reshape(len(ytr), -1), np.asarray(Xte, np.float64).reshape(len(yte), -1)
    (Xtr, Xte), _, _ = _standardise(Xtr, Xte, axis=None if task in PIXEL_TASKS else 0)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)
    if kind == "regression":
        (ytr, yte), _, _ = _standardise(np.asarray(ytr, np.float64), np.asarray(yte, np.float64))
        model = BNN(_mlp(Xtr.shape[1], 1, act=act, seed=seed))
        y_train, y_test = f32(ytr), f32(yte)
    else:
        classes = int(max(ytr.max(), yte.max())) + 1
        lik = likelihoods.Categorical()
        model = BNN(_mlp(Xtr.shape[1], classes, act=act, seed=seed), likelihood=lik)
        y_train, y_test = torch.as_tensor(ytr).long(), torch.as_tensor(yte).long()
    t0 = time.perf_counter()
    post = fit(model, f32(Xtr), y_train, method=method, seed=seed, **options)
    t1 = time.perf_counter()
    pred = post.predict(f32(Xte))
    t2 = time.perf_counter()
    metrics = evaluate(pred, None, y_test, seed=seed)
    row = {k: float(metrics[k]) for k in TABLE_KEYS[kind]}
    return {"task": task, "method": method, "seed": seed, **row, "fit_s": t1 - t0, "predict_s": t2 - t1}


# Columns of a per-run row, for either kind of task (a regression row leaves accuracy empty).
ROW_COLUMNS = ["task", "method", "seed", *dict.fromkeys(sum(TABLE_KEYS.values(), ())), "fit_s", "predict_s"]


def _worker_init() -> None:
    # One thread per worker process: the nets are small, so processes, not threads, use the cores.
    torch.set_num_threads(1)


def _run_job(job: tuple[str, str, int], options: dict) -> dict:
    task, method, seed = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return run_task(task, method, seed, **options)


def usable_cpus() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one).

    Example:
        >>> from pbnn.apps.bench import usable_cpus
        >>> usable_cpus() >= 1
        True
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_jobs(
    jobs: list[tuple[str, str, int]],
    options: dict[str, dict],
    workers: int = 1,
    rows_path: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every ``(task, method, seed)`` job with ``run_task(..., **options[method])``.

    ``workers > 1`` runs jobs in that many worker processes (one torch thread each); the
    metrics do not depend on it (every job is seeded), only the wall time does. With
    ``rows_path``, each finished job's row is appended to that CSV at once, so a long run
    that is stopped keeps what it finished. Rows come back in the order of ``jobs``.

    Example:
        >>> from pbnn.apps.bench import run_jobs
        >>> rows = run_jobs([("gap", "map", 0)], {"map": {"num_steps": 50, "progress": False}}, progress=False)
        >>> rows[0]["task"], rows[0]["method"], rows[0]["seed"]
        ('gap', 'map', 0)
    """
    from tqdm.auto import tqdm

    rows: list[dict | None] = [None] * len(jobs)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(jobs), desc="pbnn bench", disable=not progress))
        writer = None
        if rows_path is not None:
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open(rows_path, "w", newline=""))
            writer = csv.DictWriter(fh, fieldnames=ROW_COLUMNS)
            writer.writeheader()

        def done(i: int, row: dict) -> None:
            rows[i] = row
            if writer is not None:
                writer.writerow(row)
                fh.flush()
            bar.update()
            bar.set_postfix_str(f"{row['task']}/{row['method']}/{row['seed']}: {row['fit_s']:.0f} s")

        if workers <= 1:
            for i, job in enumerate(jobs):
                done(i, _run_job(job, options[job[1]]))
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch has threads can hang
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
                futures = {pool.submit(_run_job, job, options[job[1]]): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    done(futures[future], future.result())
    return rows  # type: ignore[return-value]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (and standard error over seeds) of every metric per task x method."""
    out = []
    for task, method in dict.fromkeys((r["task"], r["method"]) for r in rows):
        group = [r for r in rows if r["task"] == task and r["method"] == method]
        summary = {"task": task, "method": method, "seeds": len(group)}
        for metric in [k for k in group[0] if k not in ("task", "method", "seed")]:
            vals = np.array([r[metric] for r in group], dtype=float)
            summary[metric] = float(vals.mean())
            if len(vals) > 1:
                summary[metric + "_se"] = float(vals.std(ddof=1) / np.sqrt(len(vals)))
        out.append(summary)
    return out


def write_tables(summary: list[dict], out: Path, name: str) -> tuple[Path, Path]:
    """Write ``summary`` as ``name.csv`` and ``name.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for row in summary for k in row))
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(summary)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in summary]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def format_table(summary: list[dict]) -> str:
    """A plain-text table for the terminal."""
    cols = [c for c in dict.fromkeys(k for row in summary for k in row) if not c.endswith("_se")]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in summary)) for c in cols}
    head = "  ".join(c.rjust(widths[c]) for c in cols)
    body = ["  ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in cols) for r in summary]
    return "\n".join([head, "-" * len(head), *body])
