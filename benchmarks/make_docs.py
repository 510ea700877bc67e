"""Generate ``docs/benchmarks_results.md`` from the committed ``pbnn bench`` CSVs.

Every ``benchmarks/results/*.csv`` is a table that ``pbnn bench --out DIR`` wrote
(``DIR/results.csv``, one row per task x method: mean over seeds and ``*_se`` columns);
``benchmarks/results/runs.json`` records how each was produced (command, wall time, load).
The page shows, per task, a method x metric table of mean ± standard error over seeds,
then the published UCI reference numbers from ``benchmarks/REFERENCES.md``.

The page is generated, never edited by hand; ``tests/test_bench_docs.py`` checks that
regenerating it from the committed CSVs gives exactly the committed page.

    python benchmarks/make_docs.py            # rewrite docs/benchmarks_results.md
    python benchmarks/make_docs.py --check    # exit 1 if the page is out of date
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCES = ROOT / "benchmarks" / "REFERENCES.md"
PAGE = ROOT / "docs" / "benchmarks_results.md"

TASK_ORDER = ("gap", "friedman", "diabetes", "moons", "digits")
TASK_TEXT = {
    "gap": "1-D regression with a gap (generated; 1-50-1 tanh). Standardised units.",
    "friedman": "Friedman-1 (generated, 10 inputs, 400 train / 400 test; 10-50-1 ReLU). Standardised units.",
    "diabetes": "scikit-learn's `load_diabetes` (442 rows, 80/20 split; 10-50-1 ReLU). Standardised units. "
    "Our stand-in for the UCI protocol: no published numbers exist for it.",
    "moons": "Two moons (generated, 300 train / 500 test, noise 0.2; 2-50-2 tanh).",
    "digits": "scikit-learn's `load_digits` (1797 8x8 images, 80/20 split, pixels standardised with one "
    "train mean and std; 64-50-10 ReLU).",
}
# Metric columns, their headers, and whether lower is better (marks the best method in bold).
METRICS = {
    "regression": [("rmse", "RMSE", True), ("nll", "NLL", True), ("coverage_90", "90% coverage", None),
                   ("crps", "CRPS", True)],
    "classification": [("accuracy", "accuracy", False), ("nll", "NLL", True), ("brier", "Brier", True),
                       ("ece", "ECE", True)],
}  # fmt: skip
TIMES = [("fit_s", "fit s", 1), ("predict_s", "predict s", 2)]  # key, header, decimals


def load_rows(results: Path = RESULTS) -> list[dict]:
    """All rows of all CSVs in ``results`` (sorted by file name), each tagged with its ``run``."""
    rows = []
    for path in sorted(results.glob("*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({**row, "run": path.stem})
    return rows


def _num(row: dict, key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def _cell(row: dict, key: str, digits: int = 3) -> str:
    mean, se = _num(row, key), _num(row, key + "_se")
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mean:.{digits}f}"


def task_table(rows: list[dict], kind: str) -> list[str]:
    metrics = METRICS[kind]
    best = {}
    for key, _, lower in metrics:
        vals = [_num(r, key) for r in rows]
        if lower is not None and vals:
            best[key] = min(vals) if lower else max(vals)
    head = ["method", "seeds", *(h for _, h, _ in metrics), *(h for _, h, _ in TIMES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["seeds"]]
        for key, _, _ in metrics:
            c = _cell(r, key)
            cells.append(f"**{c}**" if key in best and _num(r, key) == best[key] else c)
        cells += [f"{_num(r, k):.{d}f}" for k, _, d in TIMES]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_table(rows: list[dict], task: str = "digits") -> list[str]:
    """The issue's digits target, checked row by row: each Bayesian method against MAP
    (accuracy within 1 point, lower NLL, lower ECE; means over seeds)."""
    by_run = {}
    for r in rows:
        if r["task"] == task:
            by_run.setdefault(r["run"], {})[r["method"]] = r
    lines = []
    for run, methods in by_run.items():
        base = methods.get("map")
        if base is None or len(methods) < 2:
            continue
        acc0, nll0, ece0 = (_num(base, k) for k in ("accuracy", "nll", "ece"))
        lines += [""] if lines else []
        lines += [
            f"Run `{run}`, against `map` (accuracy {acc0:.3f}, NLL {nll0:.3f}, ECE {ece0:.3f}):",
            "",
            "| method | accuracy - MAP | NLL - MAP | ECE - MAP | target met |",
            "|---|---|---|---|---|",
        ]
        for name, r in methods.items():
            if name == "map":
                continue
            d_acc, d_nll, d_ece = _num(r, "accuracy") - acc0, _num(r, "nll") - nll0, _num(r, "ece") - ece0
            met = abs(d_acc) <= 0.01 and d_nll < 0 and d_ece < 0
            lines.append(f"| {name} | {d_acc:+.3f} | {d_nll:+.3f} | {d_ece:+.3f} | {'yes' if met else 'no'} |")
    return lines


def reference_table(references: Path = REFERENCES) -> list[str]:
    """The first Markdown table of ``REFERENCES.md`` (the UCI protocol numbers), verbatim."""
    lines = references.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def reference_numbers(references: Path = REFERENCES) -> dict[str, dict[str, float]]:
    """The UCI reference table as ``{data set (lower case): {column header: number}}``."""
    head, _, *body = (line.strip("|").split("|") for line in reference_table(references))
    head = [h.strip() for h in head]
    return {cells[0].strip().lower(): {h: float(c) for h, c in zip(head[1:], cells[1:])} for cells in body}


def uci_table(rows: list[dict], references: dict[str, dict[str, float]]) -> list[str]:
    """One table per data set: pbnn's methods against the published MC dropout log-likelihood."""
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        group = sorted((r for r in rows if r["dataset"] == name), key=lambda r: -_num(r, "loglik"))
        ref = references.get(name, {}).get("MC dropout LL", math.nan)
        best = max(_num(r, "loglik") for r in group if r["method"] != "map")
        verdict = "matches or beats" if best >= ref else "does not reach"
        lines += [
            "",
            f"### {name}",
            "",
            f"Published MC dropout test log-likelihood: {ref:.2f}. pbnn's best Bayesian backend: "
            f"{best:.3f} ({verdict} it).",
            "",
            "| method | splits | test RMSE | test log-likelihood | fit min (all splits) |",
            "|---|---|---|---|---|",
        ]
        for r in group:
            rmse, ll = _cell(r, "rmse"), _cell(r, "loglik")
            ll = f"**{ll}**" if _num(r, "loglik") >= ref else ll
            lines.append(f"| {r['method']} | {r['splits']} | {rmse} | {ll} | {_num(r, 'fit_min'):.1f} |")
    return lines


def render(results: Path = RESULTS, references: Path = REFERENCES) -> str:
    """The Markdown page, as a string (deterministic: it depends only on the files)."""
    rows = load_rows(results)
    runs_file = results / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    out = [
        "# Benchmark results",
        "",
        "<!-- Generated by benchmarks/make_docs.py from benchmarks/results/*.csv; do not edit by hand. -->",
        "",
        "Every method with its default options (`pbnn.fit(model, x, y, method=...)`, nothing tuned), "
        "mean ± standard error over seeds (each seed: a new split and a new initialisation). "
        "Regression metrics are in standardised target units; NLL is per test point; "
        "ECE uses 15 equal-width bins. The best value per column is in bold. "
        "See [Benchmarks](benchmarks.md) for how to run them and [Calibration](calibration.md) for the metrics.",
        "",
        "## Runs",
        "",
    ]
    for name in dict.fromkeys(r["run"] for r in rows):
        info = runs.get(name, {})
        line = f"- `{name}`: `{info.get('command', 'pbnn bench')}`"
        if "wall_min" in info:
            line += f"; wall time {info['wall_min']:.1f} min"
        if "machine" in info:
            line += f" on {info['machine']}"
        out.append(line + ".")
    kinds = {"gap": "regression", "friedman": "regression", "diabetes": "regression"}
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    tasks += sorted({r["task"] for r in rows} - set(tasks))
    for task in tasks:
        # A method run again as a later run's baseline (map) is shown once: its first run's row.
        group, seen = [], set()
        for r in rows:
            if r["task"] == task and r["method"] not in seen:
                seen.add(r["method"])
                group.append(r)
        kind = kinds.get(task) or ("regression" if "rmse" in group[0] and group[0]["rmse"] else "classification")
        out += ["", f"## {task}", "", TASK_TEXT.get(task, ""), "", *task_table(group, kind)]
    target = target_table(rows)
    if target:
        out += [
            "",
            "## Digits target: every Bayesian backend against MAP",
            "",
            "The target (issue 8): at equal accuracy (within 1 point), lower NLL and lower ECE than MAP.",
            "",
            *target,
        ]
    uci_rows = load_rows(results / "uci")
    if uci_rows:
        out += [
            "",
            "## UCI regression protocol",
            "",
            "`python benchmarks/uci.py DATA_DIR` (local copies of the UCI files; pbnn bundles no UCI data): "
            "`pbnn.bench.regression_protocol(X, y, method)` with every default, 20 random 90/10 splits, "
            "one hidden layer of 50 ReLU units; test RMSE and test log-likelihood per point in the original "
            "target units, mean ± standard error over splits. A log-likelihood in bold matches or beats the "
            "published MC dropout number (Gal & Ghahramani 2016, the issue's target).",
            *uci_table(uci_rows, reference_numbers(references)),
        ]
    out += [
        "",
        "## Published reference numbers (UCI protocol)",
        "",
        "Test RMSE and test log-likelihood in original target units, mean over 20 splits, from "
        "`benchmarks/REFERENCES.md` (sources there).",
        "",
        *reference_table(references),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed page is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        ok = PAGE.exists() and PAGE.read_text() == text
        print("up to date" if ok else f"{PAGE} is out of date: run python benchmarks/make_docs.py")
        return 0 if ok else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
