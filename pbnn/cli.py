"""The ``pbnn`` command line: ``pbnn bench`` and ``pbnn demo``.

Example:
    >>> from pbnn.cli import build_parser
    >>> build_parser().parse_args(["bench", "--task", "gap", "--methods", "map,svi"]).methods
    'map,svi'
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from pbnn.bench import TASKS

    parser = argparse.ArgumentParser(prog="pbnn", description="Bayesian neural networks on Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="run backends side by side on benchmark tasks",
        description="Fit every METHOD on every TASK for each seed; print a method x metric table and "
        "write it as CSV and Markdown to --out.",
    )
    bench.add_argument("--task", default="gap", help=f"comma-separated tasks among {', '.join(TASKS)} (default: gap)")
    bench.add_argument("--methods", default="map,svi", help="comma-separated method names (default: map,svi)")
    bench.add_argument("--seeds", type=int, default=3, help="number of seeds / splits per task (default: 3)")
    bench.add_argument("--out", default="pbnn-bench-output", help="output folder for CSV / Markdown tables")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tasks gap,moons, methods map,svi, 1 seed, short runs (under 2 minutes)",
    )
    demo = sub.add_parser("demo", help="the README demo: SVI vs MAP on 1-D regression with a gap")
    demo.add_argument("--out", default="pbnn-demo-output", help="output folder for the figures")
    return parser


def _bench(args) -> int:
    from pbnn.bench import QUICK_OPTIONS, _options_for, format_table, run_task, summarise, write_tables

    tasks = ["gap", "moons"] if args.quick and args.task == "gap" else args.task.split(",")
    methods = args.methods.split(",")
    seeds = 1 if args.quick else args.seeds
    options = {
        m: (_options_for(m, QUICK_OPTIONS) if args.quick else _options_for(m, {"progress": False})) for m in methods
    }
    rows = []
    jobs = [(t, m, s) for t in tasks for m in methods for s in range(seeds)]
    for task, method, seed in tqdm(jobs, desc="pbnn bench"):  # task-major: rows group by task
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            rows.append(run_task(task, method, seed, **options[method]))
    summary = summarise(rows)
    print(format_table(summary))
    csv_path, md_path = write_tables(summary, Path(args.out), "results")
    print(f"\nwrote {csv_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    from pbnn import demo

    demo.main(["--out", args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
