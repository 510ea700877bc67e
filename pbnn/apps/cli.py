"""The ``pbnn`` command line: ``pbnn bench`` and ``pbnn demo``.

Example:
    >>> from pbnn.apps.cli import build_parser
    >>> build_parser().parse_args(["bench", "--task", "gap", "--methods", "map,svi"]).methods
    'map,svi'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from pbnn.apps.bench import DEFAULT_METHODS, TASKS

    parser = argparse.ArgumentParser(prog="pbnn", description="Bayesian neural networks on Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="run backends side by side on benchmark tasks",
        description="Fit every METHOD on every TASK for each seed; print a method x metric table and "
        "write it as CSV and Markdown to --out.",
    )
    bench.add_argument(
        "--task",
        default=None,
        help=f"comma-separated tasks among {', '.join(TASKS)} (default: all of them; diabetes and digits need "
        "scikit-learn and are skipped, with a message, without it)",
    )
    bench.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated method names (default: {','.join(DEFAULT_METHODS)}, one backend per family); "
        "an empty, duplicated or unknown name is refused",
    )
    bench.add_argument("--seeds", type=int, default=3, help="number of seeds / splits per task (default: 3)")
    bench.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, one torch thread each (default: the usable CPU cores); results do not depend on it",
    )
    bench.add_argument(
        "--out",
        default="pbnn-bench-output",
        help="output folder: results.csv / results.md (mean and standard error over seeds) and runs.csv "
        "(one row per fit, written as each finishes)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tasks gap,moons, methods map,svi (unless given), 1 seed, short runs (under 2 minutes)",
    )
    demo = sub.add_parser("demo", help="the README demo: SVI vs MAP on 1-D regression with a gap")
    demo.add_argument("--out", default="pbnn-demo-output", help="output folder for the figures")
    return parser


def _default_tasks() -> list[str]:
    from pbnn.apps.bench import SKLEARN_TASKS, TASKS

    try:
        import sklearn  # noqa: F401
    except ImportError:
        skipped = " and ".join(SKLEARN_TASKS)
        print(f"scikit-learn is not installed: skipping the {skipped} tasks (pip install 'pbnn[bench]')")
        return [t for t in TASKS if t not in SKLEARN_TASKS]
    return list(TASKS)


def _names(option: str, value: str | None, known: list[str], default: list[str] | None) -> list[str] | None:
    """The comma-separated names of ``--option`` (None: ``default``). An empty list or entry, a
    duplicated name or an unknown name ends the command with a one-line message naming the
    valid choices (``SystemExit``, no traceback); spaces around names are ignored."""
    if value is None:
        return default
    names = [v.strip() for v in value.split(",")]
    choices = f"choose comma-separated names among {', '.join(known)}"
    if not any(names):
        raise SystemExit(f"pbnn bench: {option} is empty; {choices} (or leave {option} out for the default)")
    if "" in names:
        raise SystemExit(f"pbnn bench: {option} {value!r} has an empty name; {choices}")
    dupes = sorted({v for v in names if names.count(v) > 1})
    if dupes:
        raise SystemExit(
            f"pbnn bench: {option} names {', '.join(dupes)} more than once; "
            "give each name once (--seeds sets the repeats)"
        )
    unknown = [v for v in names if v not in known]
    if unknown:
        kind = option.lstrip("-").rstrip("s")
        raise SystemExit(f"pbnn bench: unknown {kind}(s) {', '.join(unknown)}; known {kind}s: {', '.join(known)}")
    return names


def _bench(args) -> int:
    from pbnn.apps import bench

    default_tasks = ["gap", "moons"] if args.quick else None
    tasks = _names("--task", args.task, list(bench.TASKS), default_tasks)
    if args.seeds < 1 or (args.jobs is not None and args.jobs < 1):
        raise SystemExit(f"pbnn bench: --seeds and --jobs must be >= 1, got {args.seeds} and {args.jobs}")
    default_methods = ["map", "svi"] if args.quick else list(bench.DEFAULT_METHODS)
    methods = _names("--methods", args.methods, sorted(bench.BACKENDS), default_methods)
    tasks = _default_tasks() if tasks is None else tasks  # after every check: it may print a note
    seeds = 1 if args.quick else args.seeds
    options = {m: bench._options_for(m, bench.QUICK_OPTIONS if args.quick else {"progress": False}) for m in methods}
    jobs = [(t, m, s) for t in tasks for m in methods for s in range(seeds)]  # task-major: rows group by task
    workers = min(args.jobs or bench.usable_cpus(), len(jobs))
    out = Path(args.out)
    rows = bench.run_jobs(jobs, options, workers=workers, rows_path=out / "runs.csv")
    summary = bench.summarise(rows)
    print(bench.format_table(summary))
    csv_path, md_path = bench.write_tables(summary, out, "results")
    print(f"\nwrote {csv_path}, {md_path} and {out / 'runs.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    from pbnn.apps import demo

    demo.main(["--out", args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
