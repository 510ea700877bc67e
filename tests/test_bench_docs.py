"""docs/benchmarks_results.md is generated from benchmarks/results/*.csv and cannot drift."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "benchmarks" / "make_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_page_matches_csvs():
    mod = _make_docs()
    assert list((ROOT / "benchmarks" / "results").glob("*.csv")), "no committed bench CSVs"
    assert (ROOT / "docs" / "benchmarks_results.md").read_text() == mod.render(), (
        "docs/benchmarks_results.md is out of date: run python benchmarks/make_docs.py"
    )


def test_render_reflects_the_csv(tmp_path):
    """A changed number in a CSV changes the page (the check above can fail)."""
    mod = _make_docs()
    (tmp_path / "r.csv").write_text(
        "task,method,seeds,accuracy,nll,brier,ece,fit_s,predict_s,accuracy_se,nll_se\n"
        "moons,map,2,0.9,0.25,0.12,0.05,1.0,0.1,0.01,0.02\n"
        "moons,svi,2,0.91,0.2,0.1,0.03,2.0,0.2,0.01,0.01\n"
    )
    page = mod.render(tmp_path, ROOT / "benchmarks" / "REFERENCES.md")
    assert "| map | 2 | 0.900 ± 0.010 | 0.250 ± 0.020 | 0.120 | 0.050 | 1.0 | 0.10 |" in page
    assert "**0.200 ± 0.010**" in page  # svi has the best NLL
    assert "| Concrete |" in page  # reference numbers carried over from REFERENCES.md


def test_digits_target_table():
    """The issue's digits target is checked per method: within 1 accuracy point, lower NLL and ECE."""
    mod = _make_docs()
    base = {"task": "digits", "run": "r", "accuracy": "0.97", "nll": "0.07", "ece": "0.02"}
    rows = [
        {**base, "method": "map"},
        {**base, "method": "good", "accuracy": "0.975", "nll": "0.06", "ece": "0.015"},
        {**base, "method": "worse_ece", "nll": "0.06", "ece": "0.03"},
        {**base, "method": "less_accurate", "accuracy": "0.95", "nll": "0.06", "ece": "0.015"},
    ]
    lines = mod.target_table(rows)
    assert "| good | +0.005 | -0.010 | -0.005 | yes |" in lines
    assert any(line.startswith("| worse_ece |") and line.endswith("| no |") for line in lines)
    assert any(line.startswith("| less_accurate |") and line.endswith("| no |") for line in lines)


def test_baseline_rerun_in_a_later_run_is_shown_once(tmp_path):
    mod = _make_docs()
    head = "task,method,seeds,accuracy,nll,brier,ece,fit_s,predict_s\n"
    (tmp_path / "a.csv").write_text(head + "moons,map,2,0.9,0.25,0.12,0.05,1.0,0.1\n")
    rerun = "moons,map,2,0.9,0.25,0.12,0.05,9.0,0.1\nmoons,nuts,2,0.9,0.2,0.1,0.04,5.0,0.2\n"
    (tmp_path / "b.csv").write_text(head + rerun)
    page = mod.render(tmp_path, ROOT / "benchmarks" / "REFERENCES.md")
    table = page.split("## moons")[1].split("##")[0]
    assert table.count("| map |") == 1 and "| 1.0 |" in table and "| nuts |" in table


def test_uci_table_checks_each_data_set_against_published_mc_dropout():
    mod = _make_docs()
    refs = mod.reference_numbers()
    assert refs["concrete"]["MC dropout LL"] == -3.04 and refs["yacht"]["MC dropout RMSE"] == 1.11
    row = {"splits": "20", "rmse_se": "0.1", "loglik_se": "0.05", "fit_min": "1.0"}
    rows = [
        {**row, "dataset": "concrete", "method": "map", "rmse": "4.7", "loglik": "-3.74"},
        {**row, "dataset": "concrete", "method": "svi", "rmse": "5.2", "loglik": "-3.07"},
        {**row, "dataset": "yacht", "method": "laplace", "rmse": "0.5", "loglik": "-0.3"},
    ]
    lines = mod.uci_table(rows, refs)
    assert any("-3.070 (does not reach it)" in line for line in lines)
    assert any("-0.300 (matches or beats it)" in line for line in lines)
    assert "| laplace | 20 | 0.500 ± 0.100 | **-0.300 ± 0.050** | 1.0 |" in lines
    assert "| map | 20 | 4.700 ± 0.100 | -3.740 ± 0.050 | 1.0 |" in lines


def test_uci_script_reads_inputs_and_target_columns(tmp_path):
    spec = importlib.util.spec_from_file_location("uci", ROOT / "benchmarks" / "uci.py")
    uci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uci)
    table = np.arange(40.0).reshape(4, 10)  # energy: 8 inputs, heating load, cooling load
    np.savetxt(tmp_path / "energy.txt", table)
    X, y = uci.load(tmp_path, "energy")
    assert np.array_equal(X, table[:, :8]) and np.array_equal(y, table[:, 8])
    np.savetxt(tmp_path / "yacht.txt", table[:, :5])
    with pytest.raises(ValueError, match="at least 7 columns"):
        uci.load(tmp_path, "yacht")
