"""Wall time of pbnn's distributed modes: 2 ranks vs 1 process, on this machine's CPUs.

Two workloads, each run in fresh processes spawned with ``torch.multiprocessing`` (gloo,
as ``torchrun --nproc_per_node=2`` would start them); the time is that of ``pbnn.fit``
alone (the slowest rank's), after a short warm-up fit in the same process:

* **data-parallel SVI**: a 1-256-256-1 tanh net on 20,000 generated points, 300 steps,
  a global minibatch of 512 rows (2 ranks x 256, or 512 in one process: the same updates);
* **parallel NUTS chains**: 4 chains of the 1-20-1 net of ``benchmarks/nuts.py`` on 100
  points (MAP warm start, ``max_tree_depth=5``, 50 + 50 iterations); 2 ranks run 2 chains
  each. In a distributed context every chain runs on its own
  (its own generator, so any number of ranks gives the same draws), while the ordinary
  one-process fit steps all 4 chains together in one vectorised batch; both are timed.

Each rank uses 1 torch thread. The honest baseline for "2 ranks on 2 cores" is one process
with 2 threads, so that is reported too. Ratios are against baselines run by this script.

Usage: python benchmarks/distributed.py [--quick] [--svi-steps 300 --nuts-warmup 50 --nuts-draws 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pbnn
import pbnn  # noqa: E402


def svi_task(opts, distributed: bool, batch_size: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(opts.svi_points, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(opts.svi_points, generator=g)
    torch.manual_seed(0)
    width = opts.svi_width
    net = torch.nn.Sequential(
        torch.nn.Linear(1, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )

    def fit(steps):
        return pbnn.fit(
            pbnn.BNN(net), x, y, method="svi", num_steps=steps, batch_size=batch_size, seed=0,
            distributed=distributed, progress=False,
        )  # fmt: skip

    fit(5)  # warm-up: allocations, first collectives
    t0 = time.perf_counter()
    fit(opts.svi_steps)
    return time.perf_counter() - t0


def nuts_task(opts, distributed: bool, batch_size=None) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 100)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(100, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))

    def fit(warmup, draws, map_steps):
        return pbnn.fit(
            model, x, y, method="nuts", num_chains=4, warmup=warmup, num_samples=draws, map_steps=map_steps,
            max_tree_depth=opts.nuts_depth, seed=0, distributed=distributed, progress=False, warn=False,
        )  # fmt: skip

    fit(2, 2, 2)
    t0 = time.perf_counter()
    fit(opts.nuts_warmup, opts.nuts_draws, opts.map_steps)
    return time.perf_counter() - t0


TASKS = {"svi": svi_task, "nuts": nuts_task}


def _worker(rank, nranks, threads, task, distributed, batch_size, opts, tmp):
    torch.set_num_threads(threads)
    if nranks > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=nranks)
    try:
        elapsed = TASKS[task](opts, distributed, batch_size)
        if nranks > 1:  # the job ends when the slowest rank does
            t = torch.tensor([elapsed])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t)
        if rank == 0:
            Path(tmp, "time").write_text(str(elapsed))
    finally:
        if nranks > 1:
            dist.destroy_process_group()


def timed(task: str, nranks: int, threads: int, distributed: bool, opts, batch_size=None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(nranks, threads, task, distributed, batch_size, opts, tmp), nprocs=nranks, join=True)
        return float(Path(tmp, "time").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--svi-points", type=int, default=20_000)
    p.add_argument("--svi-width", type=int, default=256)
    p.add_argument("--svi-steps", type=int, default=300)
    p.add_argument("--svi-batch", type=int, default=512, help="global minibatch (split over the ranks)")
    p.add_argument("--nuts-warmup", type=int, default=50)
    p.add_argument("--nuts-draws", type=int, default=50)
    p.add_argument("--nuts-depth", type=int, default=5, help="max_tree_depth (bounds the cost per draw)")
    p.add_argument("--map-steps", type=int, default=200, help="MAP warm start of the chains")
    opts = p.parse_args()
    if opts.quick:
        opts.svi_points, opts.svi_width, opts.svi_steps, opts.nuts_warmup, opts.nuts_draws = 2000, 32, 20, 5, 5
        opts.map_steps, opts.nuts_depth = 20, 3
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} CPUs")
    B = opts.svi_batch
    rows = [
        ("SVI, 1 process, 1 thread", timed("svi", 1, 1, False, opts, B)),
        ("SVI, 1 process, 2 threads", timed("svi", 1, 2, False, opts, B)),
        ("SVI, 2 ranks x 1 thread (data-parallel)", timed("svi", 2, 1, True, opts, B // 2)),
        ("NUTS 4 chains, 1 process, 1 thread (vectorised chains)", timed("nuts", 1, 1, False, opts)),
        ("NUTS 4 chains, 1 process, 2 threads (vectorised chains)", timed("nuts", 1, 2, False, opts)),
        ("NUTS 4 chains, 1 process, 1 thread, distributed=True (chain by chain)", timed("nuts", 1, 1, True, opts)),
        ("NUTS 4 chains, 2 ranks x 1 thread (2 chains each)", timed("nuts", 2, 1, True, opts)),
    ]
    print(f"load average after: {os.getloadavg()}")
    width = max(len(name) for name, _ in rows)
    for name, t in rows:
        print(f"{name:<{width}}  {t:7.2f} s")
    t = dict(rows)
    svi2 = t["SVI, 2 ranks x 1 thread (data-parallel)"]
    nuts2 = t["NUTS 4 chains, 2 ranks x 1 thread (2 chains each)"]
    print("\nspeed-ups of 2 ranks (ratio of wall times, > 1 = faster):")
    print(f"  SVI  vs 1 process 1 thread : {t['SVI, 1 process, 1 thread'] / svi2:.2f}")
    print(f"  SVI  vs 1 process 2 threads: {t['SVI, 1 process, 2 threads'] / svi2:.2f}")
    nuts_same = t["NUTS 4 chains, 1 process, 1 thread, distributed=True (chain by chain)"]
    print(f"  NUTS vs the same chain-by-chain run in 1 process: {nuts_same / nuts2:.2f}")
    print(f"  NUTS vs vectorised chains, 1 process 1 thread   : {t[rows[3][0]] / nuts2:.2f}")
    print(f"  NUTS vs vectorised chains, 1 process 2 threads  : {t[rows[4][0]] / nuts2:.2f}")


if __name__ == "__main__":
    main()
