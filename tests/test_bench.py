import math

import numpy as np
import pytest
from pbnn.bench import PIXEL_TASKS, _standardise, regression_protocol, run_task

from pbnn.apps.cli import main


def _data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    return X, X @ np.array([1.0, -0.5]) + 0.2 * rng.normal(size=n)


def test_protocol_reports_in_original_units():
    """Scaling and shifting y must scale RMSE by the factor and shift the log-likelihood by
    -log(factor): the protocol standardises internally and converts back."""
    X, y = _data()
    a = regression_protocol(X, y, "map", n_splits=2, num_steps=300)
    b = regression_protocol(X, 10 * y + 3, "map", n_splits=2, num_steps=300)
    assert b["rmse"] == pytest.approx(10 * a["rmse"], rel=1e-3)
    assert b["loglik"] == pytest.approx(a["loglik"] - math.log(10), abs=1e-3)
    assert a["rmse"] < 0.5 and a["rmse_se"] >= 0  # noise sd 0.2, signal sd ~1.1


def test_protocol_errors():
    X, y = _data()
    with pytest.raises(ValueError, match="rows"):
        regression_protocol(X, y[:-1], "map", n_splits=1)
    with pytest.raises(ValueError, match="unknown method"):
        regression_protocol(X, y, "nope", n_splits=1)
    y_nan = y.copy()
    y_nan[3] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or inf in 1 row\(s\) \(first: \[3\]\)"):
        regression_protocol(X, y_nan, "map", n_splits=1)
    with pytest.raises(ValueError, match="n_splits must be a positive integer"):
        regression_protocol(X, y, "map", n_splits=0)
    with pytest.raises(ValueError, match="test_fraction"):
        regression_protocol(X, y, "map", n_splits=1, test_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        regression_protocol(X[:2], y[:2], "map", n_splits=1)


def test_pixel_standardisation_keeps_rare_pixels_small():
    """A border pixel that is 0 in all but one training image: per-column standardisation
    makes a test image with that pixel on an input of size ~40; one mean and std over all
    pixels keeps it on the scale of the other pixels, and the train pixels get mean 0, std 1."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 17, size=(1500, 64)).astype(float)
    train[:, 0] = 0.0
    train[0, 0] = 16.0
    test = train[:5].copy()
    test[:, 0] = 16.0
    (_, per_column), _, _ = _standardise(train, test)
    (tr, te), mu, sd = _standardise(train, test, axis=None)
    assert np.abs(per_column[:, 0]).min() > 30
    assert np.abs(te).max() < 2.5 and np.abs(tr).max() < 2.5
    assert tr.mean() == pytest.approx(0.0, abs=1e-12) and tr.std() == pytest.approx(1.0, rel=1e-12)
    assert "digits" in PIXEL_TASKS


def test_run_task_classification_metrics():
    row = run_task("moons", "map", num_steps=300, progress=False)
    assert row["accuracy"] > 0.8 and 0 <= row["ece"] <= 1 and row["nll"] > 0


def test_cli_bench_writes_tables(tmp_path, capsys):
    assert main(["bench", "--task", "gap", "--methods", "map", "--seeds", "1", "--out", str(tmp_path)]) == 0
    assert "map" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text().startswith("task,method")


def test_cli_bench_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="unknown task.*nope.*known tasks: gap"):
        main(["bench", "--task", "gap,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds and --jobs must be >= 1"):
        main(["bench", "--task", "gap", "--jobs", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method.*nope; known methods: .*csghmc"):
        main(["bench", "--task", "gap", "--methods", "map,nope", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", ""], "--task is empty; choose comma-separated names among gap, friedman"),
        (["--task", " , "], "--task is empty"),
        (["--task", "gap,,moons"], "--task 'gap,,moons' has an empty name; choose .* among gap"),
        (["--task", "gap,gap"], "--task names gap more than once; give each name once"),
        (["--methods", ""], "--methods is empty; choose comma-separated names among .*map.*svi"),
        (["--methods", "map,"], "--methods 'map,' has an empty name"),
        (["--methods", "svi,map,svi,map"], "--methods names map, svi more than once"),
        (["--methods", "nutz"], "unknown method.*nutz; known methods: .*nuts"),
        (["--task", "gap", "--methods", "map, nutz"], "unknown method.*nutz"),
    ],
)
def test_cli_bench_refuses_empty_duplicated_and_unknown_names(tmp_path, argv, message, monkeypatch):
    from pbnn.apps import bench

    ran = []
    monkeypatch.setattr(bench, "run_jobs", lambda *a, **k: ran.append(a))  # nothing may run
    with pytest.raises(SystemExit, match=message) as err:
        main(["bench", *argv, "--out", str(tmp_path)])
    text = str(err.value.code)
    assert isinstance(err.value.code, str) and "\n" not in text and text.startswith("pbnn bench: ")
    assert not ran


def test_cli_bench_names_allow_spaces(tmp_path, monkeypatch):
    from pbnn.apps import bench

    seen = {}
    monkeypatch.setattr(bench, "run_jobs", lambda jobs, *a, **k: seen.setdefault("jobs", jobs) and [])
    monkeypatch.setattr(bench, "summarise", lambda rows: [])
    monkeypatch.setattr(bench, "write_tables", lambda *a: (tmp_path / "a", tmp_path / "b"))
    monkeypatch.setattr(bench, "format_table", lambda s: "")
    assert main(["bench", "--task", " gap", "--methods", "map , svi", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert seen["jobs"] == [("gap", m, s) for m in ("map", "svi") for s in range(2)]


def test_cli_bench_quick_smoke(tmp_path):
    """`pbnn bench --quick` (the CI smoke run): both tasks, both methods, finite metrics."""
    import csv

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("gap", "moons") for m in ("map", "svi")}
    assert all(math.isfinite(float(r["nll"])) for r in rows)
    moons = [r for r in rows if r["task"] == "moons"]
    assert all(float(r["accuracy"]) > 0.8 for r in moons)


def test_run_jobs_in_worker_processes_matches_one_process(tmp_path):
    """--jobs changes the wall time only: each fit is seeded, so rows agree; runs.csv has every fit."""
    import csv

    from pbnn.bench import run_jobs

    jobs = [("gap", "map", 0), ("moons", "map", 1)]
    options = {"map": {"num_steps": 100, "progress": False}}
    serial = run_jobs(jobs, options, workers=1, progress=False)
    parallel = run_jobs(jobs, options, workers=2, rows_path=tmp_path / "runs.csv", progress=False)
    assert [(r["task"], r["seed"]) for r in parallel] == [("gap", 0), ("moons", 1)]
    for a, b in zip(serial, parallel):
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-4)
    assert serial[0]["nll"] != pytest.approx(serial[1]["nll"], rel=1e-2)  # different tasks: the check can fail
    written = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert sorted((r["task"], r["seed"]) for r in written) == [("gap", "0"), ("moons", "1")]
    assert written[0]["fit_s"] and all(r["nll"] for r in written)
