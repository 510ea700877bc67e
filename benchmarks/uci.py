"""Run the UCI regression protocol on local copies of the UCI data sets.

The data are not bundled (pbnn runs offline and ships no third-party data): put one
whitespace-separated numeric text file per data set in a folder, rows = examples, no
header, columns as in the UCI repository's original file (``concrete.txt``: 8 inputs then
strength; ``energy.txt``: 8 inputs then heating and cooling load, the target is heating load
as in Hernandez-Lobato & Adams 2015; ``yacht.txt``: 6 inputs then residuary resistance;
``kin8nm``, ``power``, ``wine`` (red): the inputs then the target).
Each (data set, method) pair runs ``pbnn.bench.regression_protocol`` with the method's
default options in its own worker process (one torch thread each), and the results are
appended to a CSV that ``benchmarks/make_docs.py`` turns into the docs' UCI table.

    python benchmarks/uci.py DATA_DIR --datasets concrete,energy,yacht \\
        --methods map,svi,laplace,mc-dropout --splits 20 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from pbnn.bench import _worker_init, regression_protocol, usable_cpus

RESULTS = Path(__file__).resolve().parent / "results" / "uci" / "protocol.csv"
COLUMNS = ["dataset", "method", "splits", "rmse", "rmse_se", "loglik", "loglik_se", "fit_min"]

# data set -> (number of input columns, target column): inputs are the first columns.
DATASETS = {
    "concrete": (8, 8),
    "energy": (8, 8),
    "kin8nm": (8, 8),
    "power": (4, 4),
    "wine": (11, 11),
    "yacht": (6, 6),
}


def load(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    n_inputs, target = DATASETS[name]
    table = np.loadtxt(data_dir / f"{name}.txt")
    needed = max(n_inputs, target + 1)
    if table.ndim != 2 or table.shape[1] < needed:
        raise ValueError(f"{name}.txt: expected a table of at least {needed} columns, got shape {table.shape}")
    return table[:, :n_inputs], table[:, target]


def run_one(data_dir: str, name: str, method: str, splits: int) -> dict:
    X, y = load(Path(data_dir), name)
    start = time.perf_counter()
    res = regression_protocol(X, y, method, n_splits=splits, seed=0)
    return {"dataset": name, "method": method, "splits": splits, **res, "fit_min": (time.perf_counter() - start) / 60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder holding NAME.txt for each data set")
    parser.add_argument("--datasets", default="concrete,energy,yacht", help=f"comma-separated, from {sorted(DATASETS)}")
    parser.add_argument("--methods", default="map,svi,laplace,mc-dropout,sghmc,swag,ensemble")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=usable_cpus())
    parser.add_argument("--out", type=Path, default=RESULTS, help="CSV to append to")
    args = parser.parse_args(argv)
    names, methods = args.datasets.split(","), args.methods.split(",")
    for name in names:
        if name not in DATASETS:
            parser.error(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
        load(args.data_dir, name)  # fail on a missing or malformed file before any fit
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    # As `pbnn bench`: spawned workers (fork after torch has threads can hang), one torch thread each.
    context = multiprocessing.get_context("spawn")
    with (
        open(args.out, "a", newline="") as fh,
        ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init) as pool,
    ):
        writer = csv.DictWriter(fh, COLUMNS)
        if new_file:
            writer.writeheader()
        futures = [pool.submit(run_one, str(args.data_dir), n, m, args.splits) for n in names for m in methods]
        for future in as_completed(futures):
            row = future.result()
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
            fh.flush()
            print(f"{row['dataset']:9s} {row['method']:12s} RMSE {row['rmse']:.3f} LL {row['loglik']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
