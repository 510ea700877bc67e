"""Persistence: atomic saves, checkpoints that hold plain data and know what they belong to,
posterior files that run no code and detect corruption (issue 27)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import pbnn

ROOT = Path(__file__).resolve().parents[1]


def _posterior(num_draws: int = 3, width: int = 4) -> pbnn.Posterior:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    x = torch.randn(10, 2)
    samples = {n: torch.randn(1, num_draws, *p.shape) for n, p in net.named_parameters()}
    return pbnn.Posterior(model, samples, data=pbnn.data.Data(x, x.sum(1)), method="made-up")


def test_save_killed_mid_write_keeps_previous_file(tmp_path):
    path = tmp_path / "post.pt"
    old = _posterior()
    old.save(path)
    marker = tmp_path / "writing"
    # A large posterior saved over the file; the writer is killed with SIGKILL once every byte
    # is written but before it is in place (os.fsync is patched to announce that and wait).
    script = textwrap.dedent(f"""
        import os, time, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_persistence import _posterior
        real = os.fsync
        def fsync(fd):
            real(fd)
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        os.fsync = fsync
        _posterior(num_draws=200, width=2000).save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the writer never reached fsync"
        assert path.stat().st_size < 1_000_000  # the large new content is not in place yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded = pbnn.Posterior.load(path, model=old.model)
    for k, v in old.samples.items():
        assert torch.equal(loaded.samples[k], v)


def test_save_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "post.pt"
    post = _posterior()
    post.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        post.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post.pt"]


# ---------------------------------------------------------------------------- checkpoints
class _Evil:
    """Unpickling this creates a marker file: loading it must never run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fit(path, *, width: int = 2, seed: int = 0, lr: float = 0.01, slope: float = 2.0, method: str = "map"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Gaussian(0.1))
    x = torch.linspace(-1, 1, 8)[:, None]
    return pbnn.fit(
        model,
        x,
        slope * x[:, 0],
        method=method,
        num_steps=6,
        lr=lr,
        seed=seed,
        progress=False,
        checkpoint_path=str(path),
        checkpoint_every=3,
    )


def test_crafted_checkpoint_runs_no_code(tmp_path):
    path, marker = tmp_path / "c.pt", tmp_path / "pwned"
    torch.save({"params": [_Evil(marker)], "step": 0}, path)
    with pytest.raises(ValueError, match="not a pbnn checkpoint that holds only tensors.*delete"):
        _fit(path)
    assert not marker.exists()


def test_checkpoint_is_plain_data_and_resumes_identically(tmp_path):
    path = tmp_path / "c.pt"
    first = _fit(path)
    state = torch.load(path, weights_only=True)  # tensors and plain data only
    assert state["format"] == "pbnn.checkpoint" and state["step"] == 5
    assert state["fingerprint"]["method"] == "map" and state["fingerprint"]["seed"] == 0
    again = _fit(path)  # finished checkpoint: resumes at the end, same numbers
    assert torch.equal(first.samples["0.weight"], again.samples["0.weight"])


@pytest.mark.parametrize(
    "change, named",
    [
        ({"slope": -3.0}, "data hash"),
        ({"seed": 1}, "seed"),
        ({"lr": 0.02}, "lr"),
        ({"width": 3}, "parameter shapes"),
        ({"method": "svi"}, "method"),
    ],
)
def test_stale_checkpoint_names_the_difference(tmp_path, change, named):
    path = tmp_path / "c.pt"
    _fit(path)
    with pytest.raises(ValueError, match=f"belongs to another fit.*{named}.*delete .* or pass another checkpoint_path"):
        _fit(path, **change)


def test_checkpoint_of_an_older_pbnn_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"params": [torch.zeros(2)], "step": 3, "losses": [1.0]}, path)
    with pytest.raises(ValueError, match="is not a pbnn checkpoint; to start afresh"):
        _fit(path)
