"""The README's demo: SVI and Laplace vs MAP on 1-D regression with a gap in the inputs.

Run ``bash scripts/demo.sh`` (or ``python -m pbnn.apps.demo --out DIR``). It prints the ELBO
progress, a table of test RMSE / NLL / CRPS / 90%-interval coverage / PIT calibration
error per method, and writes an ArviZ forest plot, the predictive bands and the
regression calibration curves (PNG) to the output folder.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pbnn.api import fit  # noqa: E402
from pbnn.core import likelihoods, priors  # noqa: E402
from pbnn.core.datasets import gap_regression  # noqa: E402
from pbnn.core.model import BNN  # noqa: E402
from pbnn.evaluation import metrics, plots  # noqa: E402
from pbnn.evaluation.metrics import evaluate  # noqa: E402
from pbnn.posterior import Posterior  # noqa: E402

# Baseline, approximation and imitation rows; every other backend is one --methods away.
DEMO_METHODS = "map,svi,laplace,ensemble,swag,fge,mc-dropout"


def make_model() -> BNN:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    return BNN(net, prior=priors.Normal(0.0, 1.0), likelihood=likelihoods.Gaussian(scale="learned"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="pbnn-demo-output", help="output folder for the figures")
    parser.add_argument("--steps", type=int, default=3000, help="optimisation steps for map, svi and laplace")
    parser.add_argument(
        "--methods",
        default=DEMO_METHODS,
        help=f"comma-separated methods (default: {DEMO_METHODS}; any name in pbnn.infer.BACKENDS works)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    d = gap_regression(seed=0)
    model = make_model()
    rows, preds, posts = {}, {}, {}
    steps = {"map": {"num_steps": args.steps}, "svi": {"num_steps": args.steps}, "laplace": {"map_steps": args.steps}}
    methods = args.methods.split(",")
    if not {"map", "svi"} <= set(methods):
        parser.error("--methods must include map and svi (the demo compares them)")
    for method in methods:
        print(f"fitting {method} ...", flush=True)
        t0 = time.perf_counter()
        post = fit(model, d["x_train"], d["y_train"], method=method, seed=0, **steps.get(method, {}))
        fit_s = time.perf_counter() - t0
        pred = post.predict(d["x_test"])
        posts[method], preds[method] = post, pred
        rows[method] = {
            **evaluate(pred, None, d["y_test"]),
            "gap_sd": float(pred.stddev[d["in_gap"]].mean()),
            "fit_s": fit_s,
        }
        losses = post.info.get("losses")
        if losses:  # the training objective per data point (-ELBO/N for SVI, -log joint/N for MAP)
            print(f"  loss: start {losses[0]:.3f}  middle {losses[len(losses) // 2]:.3f}  end {losses[-1]:.3f}")

    cols = ("rmse", "nll", "crps", "coverage_90", "pit_error", "gap_sd", "fit_s")
    print("\n" + metrics.table({m: {c: r[c] for c in cols} for m, r in rows.items()}))

    _plot_bands(d, preds, out / "predictive_bands.png")
    _plot_forest(posts["svi"], out / "svi_forest.png")
    for m, pred in preds.items():
        plots.calibration_curve(pred, d["y_test"], title=m.upper(), path=out / f"{m}_calibration.png")
    print(f"\nfigures written to {out.resolve()}/: predictive_bands.png, svi_forest.png, *_calibration.png")
    verdict = "beats" if rows["svi"]["nll"] < rows["map"]["nll"] else "does NOT beat"
    print(f"SVI {verdict} MAP on test NLL ({rows['svi']['nll']:.3f} vs {rows['map']['nll']:.3f}).")
    return rows


def _plot_bands(d: dict, preds: dict, path: Path) -> None:
    cols = min(4, len(preds))
    rows = (len(preds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(preds) :]:
        ax.axis("off")
    axes = axes.flat
    xs = d["x_test"][:, 0]
    for ax, (m, pred) in zip(axes, preds.items()):
        lo, hi = pred.interval(0.9)
        ax.fill_between(xs, lo, hi, alpha=0.3, label="90% predictive interval")
        ax.plot(xs, pred.mean, lw=2, label="predictive mean")
        ax.scatter(d["x_train"][:, 0], d["y_train"], s=6, c="k", label="train")
        ax.axvspan(-0.8, 0.8, color="grey", alpha=0.1)
        ax.set_title(m.upper())
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_forest(post: Posterior, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        idata = post.to_arviz()
        az.plot_forest(idata, var_names=["sigma", "2.bias", "0.bias"], coords={}, combined=True, figsize=(5, 8))
    plt.savefig(path, dpi=110, bbox_inches="tight")
    plt.close("all")


if __name__ == "__main__":
    main()
