"""Data-parallel training (2 gloo ranks on CPU), gradient accumulation and checkpoints."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pbnn
from pbnn.training import run_adam


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(64, generator=g)


def _model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return pbnn.BNN(net)


def _svi(**kw):
    x, y = _data()
    opts = dict(num_steps=40, num_samples=5, seed=3, progress=False, lr=0.05)
    return pbnn.fit(_model(), x, y, method="svi", **{**opts, **kw})


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        post = _svi(batch_size=8, distributed=True)
        torch.save(post.approximation.q.mean, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_svi_matches_one_process_on_the_union_of_batches(tmp_path):
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = _svi(batch_size=16).approximation.q.mean  # 2 ranks x 8 rows = one batch of 16
    assert torch.equal(r0, r1)  # every rank holds the same parameters
    assert torch.allclose(r0, single, atol=1e-5)
    # and it is not trivially equal to a different run:
    assert not torch.allclose(single, _svi(batch_size=8).approximation.q.mean, atol=1e-3)


def test_gradient_accumulation_equals_one_big_batch():
    big = _svi(batch_size=16).approximation.q.mean
    acc = _svi(batch_size=16, accumulate=4).approximation.q.mean
    assert torch.allclose(big, acc, atol=1e-5)
    mapped = pbnn.fit(
        _model(), *_data(), method="map", num_steps=30, batch_size=16, accumulate=2, seed=0, progress=False
    )
    ref = pbnn.fit(_model(), *_data(), method="map", num_steps=30, batch_size=16, seed=0, progress=False)
    assert torch.allclose(mapped.samples["0.weight"], ref.samples["0.weight"], atol=1e-5)


def test_resume_from_checkpoint_ends_in_the_same_state():
    target = torch.tensor([1.0, -2.0, 3.0])

    def run(path, fail_at=None):
        w = torch.zeros(3, requires_grad=True)
        calls = {"n": 0}

        def loss(idx):
            calls["n"] += 1
            if fail_at is not None and calls["n"] > fail_at:
                raise KeyboardInterrupt("killed")
            noise = 0.1 * torch.randn(3)  # uses the RNG, which the checkpoint must restore
            return ((w - target - noise) ** 2).sum()

        losses = run_adam(
            [w],
            loss,
            num_steps=40,
            lr=0.1,
            n=1,
            batch_size=None,
            desc="t",
            progress=False,
            checkpoint_path=path,
            checkpoint_every=10,
        )
        return w.detach(), losses

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ref, ref_losses = run(os.path.join(d, "a.pt"))
        torch.manual_seed(0)
        path = os.path.join(d, "b.pt")
        with pytest.raises(KeyboardInterrupt):
            run(path, fail_at=25)  # dies after the checkpoint at step 20
        assert torch.load(path, weights_only=False)["step"] == 19
        torch.manual_seed(123)  # a different process would start from another RNG state
        resumed, losses = run(path)
    assert torch.equal(resumed, ref)
    assert losses == ref_losses


def test_svi_checkpoint_resume(tmp_path):
    path = str(tmp_path / "svi.pt")
    a = _svi(checkpoint_path=path, checkpoint_every=10)
    b = _svi(checkpoint_path=path, checkpoint_every=10)  # finished checkpoint: nothing left to do
    assert torch.equal(a.approximation.q.mean, b.approximation.q.mean)


def test_pyro_models_refuse_accumulation():
    import pyro
    import pyro.distributions as pdist

    def model(x, y=None):
        w = pyro.sample("w", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", pdist.Normal(w * x[:, 0], 1.0), obs=y)

    with pytest.raises(ValueError, match="pbnn.BNN"):
        pbnn.fit(model, *_data(), method="svi", accumulate=2, num_steps=2)
