"""Image benchmark of issue 26: CNNs with BatchNorm fed by a DataLoader. Not a test.

(a) accuracy / NLL / ECE on scikit-learn's digits as 1x8x8 images, a small ResNet-style CNN
    with BatchNorm, ``pbnn.fit(model, loader)`` and ``pbnn.evaluate(post, test_loader)``, for
    map, svi (local_reparam), laplace (last-layer KFAC), sghmc, csghmc, swag, multiswag,
    mc-dropout and ensemble, over ``--seeds`` seeds (mean and standard error);
(b) time per epoch against a plain torch SGD loop over the same net and the same DataLoader,
    in the same process, on CIFAR-shaped synthetic data (3x32x32, 10 classes, a ResNet-20
    with ~0.27M weights): sghmc, swag, mc-dropout, svi (local_reparam) as ratios per epoch,
    and a last-layer KFAC Laplace fit (curvature pass; ``map_steps=1``) against one epoch;
(c) a ResNet-18 (~11M weights) on a few CIFAR-shaped points: SVI, KFAC Laplace and SWAG fitted
    for a few steps, saved, loaded, used: file size and predict throughput (points/s).

Run from the repository root (scikit-learn needed for (a): ``pip install -e .[bench]``):

    PYTHONPATH=$PWD python benchmarks/images.py                      # 3 seeds, all parts
    PYTHONPATH=$PWD python benchmarks/images.py --seeds 1 --quick    # reduced settings
    PYTHONPATH=$PWD python benchmarks/images.py --parts b --device cuda

Times include each fit's set-up (checks, first batch); the plain loop has none. The tables
of one run are in docs/benchmarks_images.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pbnn


class Block(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet(cin: int, widths: tuple[int, ...], blocks: int, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """CIFAR-style ResNet: a 3x3 stem, ``blocks`` blocks per stage (stride 2 from the second
    stage on), global average pooling, optional dropout, a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(Block(c, w, 2 if (i > 0 and j == 0) else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c, num_classes))
    return nn.Sequential(*layers)


def small_cnn(dropout: float = 0.0) -> nn.Module:
    return resnet(1, (16, 32), 1, dropout=dropout)


def resnet20(dropout: float = 0.0) -> nn.Module:
    return resnet(3, (16, 32, 64), 3, dropout=dropout)


def resnet18() -> nn.Module:
    return resnet(3, (64, 128, 256, 512), 2)


def num_weights(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _options(method: str, steps: int) -> dict:
    """Each method's options for a budget of ``steps`` optimiser / sampler steps."""
    half = max(1, steps // 2)
    return {
        "map": dict(num_steps=steps),
        "svi": dict(num_steps=steps, estimator="local_reparam", num_samples=30),
        "laplace": dict(map_steps=steps, hessian="kfac", subset="last_layer", num_samples=30),
        "sghmc": dict(init="map", map_steps=half, warmup=max(1, half // 2), num_samples=20,
                      thinning=max(1, half // 2 // 20)),
        "csghmc": dict(init="net", num_cycles=4, cycle_length=max(4, steps // 4), num_samples=20),
        "swag": dict(map_steps=half, num_steps=steps, num_samples=20),
        "multiswag": dict(map_steps=half, num_steps=steps, num_members=3, num_samples=10),
        "mc-dropout": dict(num_steps=steps, num_samples=30),
        "ensemble": dict(num_steps=steps, num_members=5),
    }[method]  # fmt: skip


METHODS_A = ("map", "svi", "laplace", "sghmc", "csghmc", "swag", "multiswag", "mc-dropout", "ensemble")


def part_a(seeds: int, epochs: int, device: str, methods: tuple[str, ...] = METHODS_A) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for seed in range(seeds):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        tr, te = perm[:1437], perm[1437:]  # 80 / 20
        train = DataLoader(TensorDataset(x[tr].to(device), y[tr].to(device)), batch_size=128, shuffle=True)
        test = DataLoader(TensorDataset(x[te].to(device), y[te].to(device)), batch_size=256)
        steps = epochs * len(train)
        for method in methods:
            torch.manual_seed(seed)
            net = small_cnn(dropout=0.1 if method == "mc-dropout" else 0.0).to(device)
            model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())
            t0 = time.perf_counter()
            post = pbnn.fit(model, train, method=method, seed=seed, progress=False, **_options(method, steps))
            times[method].append(time.perf_counter() - t0)
            rows[method].append(pbnn.evaluate(post, test))
            m = rows[method][-1]
            print(f"(a) seed {seed} {method:>10}: acc {m['accuracy']:.3f} nll {m['nll']:.3f} ece {m['ece']:.3f}"
                  f" ({times[method][-1]:.1f} s)", flush=True)  # fmt: skip

    def cell(vals: list[float]) -> str:
        mean = sum(vals) / len(vals)
        if len(vals) < 2:
            return f"{mean:.3f}"
        se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
        return f"{mean:.3f} ± {se:.3f}"

    out = [
        f"Digits as 1x8x8 images, small ResNet-style CNN with BatchNorm ({num_weights(small_cnn())} weights), "
        f"{epochs} epochs of batches of 128 ({seeds} seed(s)):",
        "",
        "| method | accuracy | NLL | ECE | fit time (s) |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        r = rows[m]
        out.append(
            f"| {m} | {cell([v['accuracy'] for v in r])} | {cell([v['nll'] for v in r])} | "
            f"{cell([v['ece'] for v in r])} | {sum(times[m]) / len(times[m]):.1f} |"
        )
    return out


def _cifar_loader(batches: int, batch_size: int, device: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batches * batch_size
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=batch_size, shuffle=True)


def _plain_epoch_time(loader: DataLoader, epochs: int, device: str) -> float:
    torch.manual_seed(0)
    net = resnet20(dropout=0.1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / epochs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def part_b(batches: int, batch_size: int, epochs: int, device: str) -> list[str]:
    loader = _cifar_loader(batches, batch_size, device)
    steps = epochs * len(loader)
    _plain_epoch_time(loader, 1, device)  # warm-up (allocator, kernels)
    plain = _plain_epoch_time(loader, epochs, device)
    print(f"(b) plain torch SGD: {plain:.2f} s / epoch", flush=True)
    cases = {
        "sghmc": dict(warmup=steps // 2, num_samples=max(1, steps // 2), thinning=1),
        "swag": dict(map_steps=0, num_steps=steps, collect_every=1, num_samples=1),
        "mc-dropout": dict(num_steps=steps, num_samples=1),
        "svi": dict(num_steps=steps, estimator="local_reparam", num_samples=1),
    }
    rows = [("plain torch SGD", plain, 1.0, "")]
    targets = {"sghmc": 1.2, "swag": 1.2, "mc-dropout": 1.2, "svi": 2.0}
    for method, opts in cases.items():
        torch.manual_seed(0)
        model = pbnn.BNN(resnet20(dropout=0.1).to(device), likelihood=pbnn.likelihoods.Categorical())
        _sync(device)
        t0 = time.perf_counter()
        pbnn.fit(model, loader, method=method, seed=0, progress=False, **opts)
        _sync(device)
        per = (time.perf_counter() - t0) / epochs
        rows.append((method, per, per / plain, f"<= {targets[method]}x"))
        print(f"(b) {method}: {per:.2f} s / epoch ({per / plain:.2f}x)", flush=True)
    torch.manual_seed(0)
    model = pbnn.BNN(resnet20(dropout=0.1).to(device), likelihood=pbnn.likelihoods.Categorical())
    t0 = time.perf_counter()
    pbnn.fit(model, loader, method="laplace", hessian="kfac", subset="last_layer", map_steps=1, seed=0,
             progress=False)  # fmt: skip
    lap = time.perf_counter() - t0
    rows.append(("laplace fit (last-layer KFAC, map_steps=1)", lap, lap / plain, "<= 1 epoch"))
    print(f"(b) laplace: {lap:.2f} s ({lap / plain:.2f} epochs)", flush=True)
    out = [
        f"ResNet-20 ({num_weights(resnet20(dropout=0.1))} weights, dropout 0.1 before the head), synthetic "
        f"3x32x32 data, {batches} batches of {batch_size} per epoch, {epochs} epoch(s), device {device}:",
        "",
        "| fit | seconds per epoch | ratio to plain SGD | issue target |",
        "|---|---|---|---|",
    ]
    for name, per, ratio, target in rows:
        unit = " (whole fit)" if name.startswith("laplace") else ""
        out.append(f"| {name} | {per:.2f}{unit} | {ratio:.2f} | {target} |")
    return out


def part_c(steps: int, points: int, device: str) -> list[str]:
    loader = _cifar_loader(2, points // 2, device)
    x_new = torch.randn(points, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    cases = {
        "svi (local_reparam)": ("svi", dict(num_steps=steps, estimator="local_reparam", num_samples=10)),
        "laplace (KFAC, conv + linear layers)": (
            "laplace",
            dict(map_steps=steps, hessian="kfac", subset="all", prior_precision=1.0, num_samples=10),
        ),
        "swag (rank 2)": ("swag", dict(map_steps=1, num_steps=steps + 1, collect_every=1, rank=2, num_samples=10)),
    }
    out = [
        f"ResNet-18 ({num_weights(resnet18())} weights), {2 * (points // 2)} synthetic 3x32x32 training points, "
        f"{steps} step(s) per fit, predict on {points} new points with 10 draws, device {device}:",
        "",
        "| posterior | fit (s) | file size (MB) | save (s) | load (s) | predict (points/s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (method, opts) in cases.items():
        torch.manual_seed(0)
        net = resnet18().to(device)
        # KFAC covers Linear and Conv2d layers: the BatchNorm affine parameters stay point estimates there.
        bn = {
            f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")
        }
        bayesian = (lambda name, bn=bn: name not in bn) if method == "laplace" else None
        model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical(), bayesian=bayesian)
        t0 = time.perf_counter()
        post = pbnn.fit(model, loader, method=method, seed=0, progress=False, **opts)
        fit = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "post.pt")
            t0 = time.perf_counter()
            post.save(path)
            save = time.perf_counter() - t0
            size = os.path.getsize(path) / 2**20
            t0 = time.perf_counter()
            loaded = pbnn.Posterior.load(path, model=model)
            load = time.perf_counter() - t0
        t0 = time.perf_counter()
        float(loaded.predict(x_new).mean.sum())  # force the (lazy) prediction
        _sync(device)
        tput = points / (time.perf_counter() - t0)
        out.append(f"| {name} | {fit:.1f} | {size:.1f} | {save:.2f} | {load:.2f} | {tput:.1f} |")
        print(f"(c) {out[-1]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="reduced settings (see --help of each number)")
    ap.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab'")
    ap.add_argument("--methods", default=",".join(METHODS_A), help="(a) comma-separated methods")
    ap.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    ap.add_argument("--epochs", type=int, default=None, help="(a) epochs (default 30, --quick 5)")
    ap.add_argument("--batches", type=int, default=None, help="(b) batches per epoch (default 40, --quick 4)")
    ap.add_argument("--bench-epochs", type=int, default=None, help="(b) epochs timed (default 3, --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="(c) steps per fit (default 20, --quick 2)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    warnings.simplefilter("ignore")  # short fits warn that they fit badly
    q = args.quick
    epochs = args.epochs or (5 if q else 30)
    batches = args.batches or (4 if q else 40)
    bench_epochs = args.bench_epochs or (1 if q else 3)
    steps = args.steps or (2 if q else 20)
    lines = [
        f"Command: `python benchmarks/images.py {' '.join(sys.argv[1:])}`; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU(s), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"device {args.device}.",
        "",
    ]
    if "a" in args.parts:
        lines += (
            ["## (a) Digits as images", ""]
            + part_a(args.seeds, epochs, args.device, tuple(args.methods.split(",")))
            + [""]
        )
    if "b" in args.parts:
        lines += ["## (b) Time per epoch against plain torch", ""] + part_b(batches, 128, bench_epochs, args.device)
        lines += [""]
    if "c" in args.parts:
        lines += ["## (c) ResNet-18 posteriors: file size and predict throughput", ""]
        lines += part_c(steps, 32, args.device) + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
