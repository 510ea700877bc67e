"""Peak memory and time of ``post.predict(x)`` + ``interval(0.9)`` at scale (issue 26, item 6). Not a test.

An SVI (mean-field) posterior of a small MLP (1 -> 50 -> 50 -> 1, tanh; fitted for a few
steps: the fit's quality does not matter here) with 1000 draws predicts at N points; each
case runs in its own subprocess, which reports its peak resident memory
(``resource.getrusage(...).ru_maxrss``) before and after predicting, and the times of
``predict``, of ``interval(0.9)`` and of the predictive ``mean``.

Run from the repository root with the pbnn to measure on the path:

    PYTHONPATH=$PWD python benchmarks/predict_scale.py                 # 20k x 1000 and 200k x 1000
    PYTHONPATH=/path/to/old/pbnn python benchmarks/predict_scale.py --points 20000

``--points`` / ``--draws`` pick one case. The numbers of one run are in docs/posterior.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(points: int, draws: int) -> dict:
    import warnings

    import torch
    from torch import nn

    import pbnn

    warnings.simplefilter("ignore")  # a 20-step fit warns that it fits badly
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    x_train = torch.linspace(-2, 2, 200)[:, None]
    y_train = torch.sin(2 * x_train[:, 0])
    post = pbnn.fit(model, x_train, y_train, method="svi", num_steps=20, num_samples=draws, progress=False, seed=0)
    x = torch.linspace(-3, 3, points)[:, None]
    before = _rss_mb()
    t0 = time.perf_counter()
    pred = post.predict(x)
    t1 = time.perf_counter()
    lo, hi = pred.interval(0.9)
    t2 = time.perf_counter()
    mean = pred.mean
    t3 = time.perf_counter()
    result_mb = (lo.numel() + hi.numel() + mean.numel()) * 4 / 2**20
    return {
        "points": points,
        "draws": draws,
        "predict_s": round(t1 - t0, 2),
        "interval_s": round(t2 - t1, 2),
        "mean_s": round(t3 - t2, 3),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(_rss_mb()),
        "result_mb": round(result_mb, 2),
        "torch_threads": torch.get_num_threads(),
    }


def run_case(points: int, draws: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--points", str(points), "--draws", str(draws)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.TimeoutExpired:
        return {"points": points, "draws": draws, "error": f"did not finish in {timeout:.0f} s"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="*", default=[20_000, 200_000])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.points[0], args.draws)))
        return
    for n in args.points:
        print(json.dumps(run_case(n, args.draws, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
