"""Data-parallel training (2 gloo ranks on CPU), gradient accumulation and checkpoints."""

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_reproducibility import Killed, kill_at, minibatch_resume_case

import pbnn
from pbnn.engine.optim import decay, optimise


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

        losses = optimise(
            [w],
            loss,
            num_steps=40,
            lr=decay(0.1, 40),
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


# ------------------------------------------- pbnn creates the group: exact resume and timeouts
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_worker(rank, port, out_dir):
    """One rank of a torchrun-like job (pbnn.fit creates the group from the environment)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    out, res = Path(out_dir), {}
    try:
        with pytest.MonkeyPatch.context() as m:
            for method in ("svi", "map"):
                (out / method).mkdir(exist_ok=True)
                ref, resumed, saved = minibatch_resume_case(method, None, out / method, m, distributed=True, timeout=60)
                res[method] = dict(saved=saved, ref=_state(ref), resumed=_state(resumed))
        stop = out / "rank0_done"
        if rank == 1:  # stops answering mid-fit (stuck, not dead) until rank 0 has given up
            with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
                kill_at(m, 3)
                _svi(batch_size=8, num_steps=20, distributed=True, timeout=2)
            deadline = time.monotonic() + 120
            while not stop.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            start = time.monotonic()
            try:
                _svi(batch_size=8, num_steps=20, distributed=True, timeout=2)
                res["stuck"] = ("no error", time.monotonic() - start)
            except pbnn.distributed.DistributedTimeoutError as err:
                res["stuck"] = (str(err), time.monotonic() - start)
            finally:
                stop.touch()
        torch.save(res, out / f"env{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _state(post):
    return dict(losses=post.info["losses"], **{f"samples/{k}": v for k, v in post.samples.items()})


@pytest.fixture(scope="module")
def env_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("env")
    mp.spawn(_env_worker, args=(_free_port(), str(d)), nprocs=2, join=True)
    return torch.load(d / "env0.pt", weights_only=False), torch.load(d / "env1.pt", weights_only=False)


@pytest.mark.parametrize("method", ["svi", "map"])
def test_killed_data_parallel_minibatch_fit_resumes_bit_identically(env_ranks, method):
    """Two ranks, batch_size=64 per rank, seed=None (rank 0's seed is broadcast), killed after
    the checkpoint of step 19 and resumed with other RNG states: the uninterrupted run's
    losses, parameters and draws, bit for bit, on both ranks."""
    r0, r1 = (r[method] for r in env_ranks)
    assert r0["saved"] == r1["saved"] == 19
    for r in (r0, r1):
        assert r["ref"].keys() == r["resumed"].keys() and len(r["ref"]["losses"]) == 30
        assert r["resumed"]["losses"] == r["ref"]["losses"]
        for k, v in r["ref"].items():
            if k != "losses":
                assert torch.equal(r["resumed"][k], v), k
                assert torch.equal(r1["ref"][k], r0["ref"][k]), k  # every rank holds the same


def test_a_stuck_rank_ends_the_job_with_an_error_naming_the_timeout(env_ranks):
    message, seconds = env_ranks[0]["stuck"]
    assert "all_reduce on rank 0 of 2 failed or did not complete within timeout=2 s" in message, message
    assert "another rank stopped, crashed or is stuck" in message
    assert 1.5 < seconds < 30  # the 2 s timeout, not gloo's 30-minute default


def test_timeout_is_checked():
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        pbnn.fit(_model(), *_data(), method="map", num_steps=2, distributed=True, timeout=0)
    with pytest.raises(ValueError, match="timeout= applies to distributed fits only"):
        pbnn.fit(_model(), *_data(), method="map", num_steps=2, timeout=10)


def test_pyro_models_refuse_accumulation():
    import pyro
    import pyro.distributions as pdist

    def model(x, y=None):
        w = pyro.sample("w", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", pdist.Normal(w * x[:, 0], 1.0), obs=y)

    with pytest.raises(ValueError, match="pbnn.BNN"):
        pbnn.fit(model, *_data(), method="svi", accumulate=2, num_steps=2)


# ---------------------------------------------------------------------------- parallel chains
# Small runs of each chain-parallel backend. Every case is run once on 2 gloo ranks (one spawn
# for all of them) and compared with the same call in one process.
CHAIN_CASES = {
    # 3 chains over 2 ranks: an uneven split (2 + 1) checks the chain offsets
    "nuts": dict(method="nuts", num_chains=3, num_samples=15, warmup=15, max_tree_depth=4, map_steps=30, warn=False),
    "hmc": dict(method="hmc", num_chains=2, num_samples=10, warmup=10, num_leapfrog_steps=5, init="net", warn=False),
    "mh": dict(method="mh", num_chains=3, num_samples=20, warmup=20, init="net", warn=False),
    "ensemble": dict(method="ensemble", num_members=3, num_steps=30, bootstrap=True),
    "multiswag": dict(method="multiswag", num_members=3, map_steps=20, num_steps=40, num_samples=4, rank=3),
    "sgld_chains": dict(method="sgld", num_chains=3, num_samples=10, warmup=5, thinning=2, batch_size=16),
    "csghmc_chains": dict(method="csghmc", num_chains=2, num_samples=8, num_cycles=2, thinning=2, batch_size=16),
    # one chain: data-parallel gradients, 8 rows per rank = one process with batches of 16
    "sgld_dp": dict(method="sgld", num_chains=1, num_samples=20, warmup=10, thinning=2, batch_size=8),
}


def _chain_fit(case, **kw):
    opts = {**CHAIN_CASES[case], **kw}
    return pbnn.fit(_model(), *_data(), seed=5, progress=False, **opts)


def _result(post):
    out = {f"samples/{k}": v for k, v in post.samples.items()}
    out.update({f"stats/{k}": v for k, v in post.sample_stats.items()})
    out["predict"] = post.predict(_data()[0][:5], seed=0).mean
    return out


def _chains_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        res = {case: _result(_chain_fit(case, distributed=True)) for case in CHAIN_CASES}
        torch.save(res, os.path.join(out_dir, f"chains{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("chains")
    mp.spawn(_chains_worker, args=(str(d / "init"), str(d)), nprocs=2, join=True)
    r0, r1 = torch.load(d / "chains0.pt"), torch.load(d / "chains1.pt")
    for case in CHAIN_CASES:  # every rank returns the same, complete Posterior
        assert r0[case].keys() == r1[case].keys()
        assert all(torch.equal(r0[case][k], r1[case][k]) for k in r0[case]), case
    return r0


def _assert_same(got, ref, atol):
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert torch.allclose(got[k].double(), ref[k].double(), atol=atol), k


@pytest.mark.parametrize("case", ["nuts", "hmc", "mh"])
def test_parallel_mcmc_chains_equal_one_process(two_ranks, case):
    got = two_ranks[case]
    C, S = CHAIN_CASES[case]["num_chains"], CHAIN_CASES[case]["num_samples"]
    assert got["samples/0.weight"].shape == (C, S, 8, 1)  # [chains, draws, *shape]
    # One process with the same seed (distributed=True without a group: the same per-chain seeds).
    # Same operations on the same inputs, so only float noise may differ.
    _assert_same(got, _result(_chain_fit(case, distributed=True)), atol=1e-5)
    # The chains differ from each other, so a wrong offset or order would be seen.
    w = got["samples/0.weight"]
    assert not torch.allclose(w[0], w[-1])


@pytest.mark.parametrize("case", ["ensemble", "multiswag", "sgld_chains", "csghmc_chains"])
def test_parallel_members_and_sgmcmc_chains_equal_the_plain_fit(two_ranks, case):
    got = two_ranks[case]
    ref = _result(_chain_fit(case))  # the ordinary single-process fit, no distributed context
    _assert_same(got, ref, atol=1e-5)
    w = got["samples/0.weight"]
    assert w.shape[0] == CHAIN_CASES[case].get("num_chains", CHAIN_CASES[case].get("num_members"))
    assert not torch.allclose(w[0], w[-1])


def test_data_parallel_sgld_equals_one_process_on_the_union_of_batches(two_ranks):
    got = two_ranks["sgld_dp"]
    assert got["samples/0.weight"].shape == (1, 20, 8, 1)
    # One process, same seed (same noise and permutation), batches of 2 x 8 rows. The
    # all-reduced gradient differs from the one-process gradient by float rounding only.
    _assert_same(got, _result(_chain_fit("sgld_dp", batch_size=16)), atol=1e-4)
    # and it is not trivially equal to the chain on batches of 8:
    other = _result(_chain_fit("sgld_dp"))["samples/0.weight"]
    assert not torch.allclose(got["samples/0.weight"], other, atol=1e-3)


def test_chain_split_and_gather_helpers():
    from pbnn import distributed

    assert distributed.chain_slice(5) == slice(0, 5)
    gen = torch.Generator().manual_seed(0)
    out = distributed.map_chains(lambda c, g: ({"x": torch.full((1, 2), float(c))}, [c]), 3, gen)
    assert out[0]["x"][:, 0].tolist() == [0.0, 1.0, 2.0] and out[1] == [0, 1, 2]
