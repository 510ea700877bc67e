"""Data in: ``pbnn.fit(model, loader)`` with a DataLoader, a Dataset or a re-iterable of batches
(issue 26, item 1). Tiny nets, few steps."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_reproducibility import Killed, kill_at
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

import pbnn
from pbnn.core import data as data_mod
from pbnn.core.data import Batch, LoaderData


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, x[:, 0] - x[:, 1] + 0.1 * torch.randn(n, generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    return pbnn.BNN(net)


def _conjugate_model(c):
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 1)
    return pbnn.BNN(lin, prior=pbnn.priors.Normal(0.0, c["alpha"]), likelihood=pbnn.likelihoods.Gaussian(c["sigma"]))


def _flat(post):
    return torch.cat([post.samples[k].reshape(-1) for k in sorted(post.samples)])


FAST = {
    "map": {"num_steps": 30},
    "svi": {"num_steps": 30},
    "sgld": {"num_samples": 5, "warmup": 2, "init": "net"},
    "ensemble": {"num_members": 2, "num_steps": 10},
    "mc-dropout": {"num_steps": 20, "num_samples": 5},
}


# ----------------------------------------------------------------- same numbers as tensors
@pytest.mark.parametrize("method", sorted(FAST))
def test_one_batch_loader_gives_the_numbers_of_the_tensor_fit(method):
    """A loader yielding all rows in order in one batch is the full-batch fit, bit for bit: the
    loader's reads run on their own RNG stream, so the fit's random draws are unchanged."""
    x, y = _data()
    a = pbnn.fit(_model(), x, y, method=method, seed=3, progress=False, **FAST[method])
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    b = pbnn.fit(_model(), loader, method=method, seed=3, progress=False, **FAST[method])
    assert isinstance(b.data, LoaderData) and len(b.data) == len(x)
    assert torch.equal(_flat(a), _flat(b))


def test_dataset_and_tensor_dataset_are_stacked_into_the_tensor_fit():
    x, y = _data()

    class Pairs(Dataset):  # map-style, items (x_i, y_i) with a Python float target
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], float(y[i])

    a = pbnn.fit(_model(), x, y, method="map", num_steps=30, seed=0, progress=False)
    for data in (TensorDataset(x, y), Pairs()):
        b = pbnn.fit(_model(), data, method="map", num_steps=30, seed=0, progress=False)
        assert isinstance(b.data, data_mod.Data)
        assert torch.equal(_flat(a), _flat(b))


def test_batch_log_joint_is_the_index_log_joint_scaled_by_n_over_b():
    x, y = _data()
    model = _model()
    pot = pbnn.potential.Potential(model, pbnn.data.validate(model, x, y))
    z = pot.initial_z() + 0.1
    idx = torch.tensor([3, 7, 11, 20, 31])
    by_batch = pot.log_joint(z, Batch(x[idx], y[idx]))
    assert torch.allclose(by_batch, pot.log_joint(z, idx), rtol=1e-6, atol=0)
    # and against the definition: log prior + log |J| + N / B * log-likelihood of the rows
    lp_all_rows_zero = pot.log_joint(z, Batch(x[idx], y[idx]))
    sample, log_det = pot.unpack(z)
    ll = model.log_likelihood(sample, x[idx], y[idx], pot.fixed).sum()
    expected = pot._log_prior(z, sample) + log_det + len(x) / len(idx) * ll
    assert torch.allclose(lp_all_rows_zero, expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------- minibatches from the loader
def test_minibatch_loader_map_finds_the_conjugate_mode(conjugate):
    c = conjugate
    loader = DataLoader(TensorDataset(c["x"], c["y"]), batch_size=10, shuffle=True)
    post = pbnn.fit(_conjugate_model(c), loader, method="map", num_steps=600, lr=0.05, seed=0, progress=False)
    got = torch.cat([post.samples["weight"].reshape(-1), post.samples["bias"].reshape(-1)])
    assert (got - c["mean"]).abs().max() < 0.03, (got, c["mean"])
    tensor = pbnn.fit(_conjugate_model(c), c["x"], c["y"], method="map", num_steps=600, lr=0.05, seed=0, progress=False)
    want = torch.cat([tensor.samples["weight"].reshape(-1), tensor.samples["bias"].reshape(-1)])
    assert (want - c["mean"]).abs().max() < 0.03


def test_minibatch_loader_sghmc_matches_the_conjugate_posterior(conjugate):
    c = conjugate
    loader = DataLoader(TensorDataset(c["x"], c["y"]), batch_size=25, shuffle=True)
    post = pbnn.fit(_conjugate_model(c), loader, method="sghmc", num_samples=100, warmup=50, seed=0, progress=False)
    draws = torch.cat([post.samples["weight"].reshape(-1, 2), post.samples["bias"].reshape(-1, 1)], 1)
    sd = c["cov"].diagonal().sqrt()
    assert ((draws.mean(0) - c["mean"]).abs() / sd).max() < 0.5, (draws.mean(0), c["mean"])
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.3, (draws.std(0), sd)


def test_accumulated_micro_batches_of_loader_batches_give_the_same_fit():
    """accumulate=k splits each loader batch into k micro-batches weighted by their share: the
    same gradient (the engine's data-parallel path, with one rank)."""
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    a = pbnn.fit(_model(), loader, method="map", num_steps=20, seed=0, progress=False)
    b = pbnn.fit(_model(), loader, method="map", num_steps=20, seed=0, progress=False, accumulate=3)
    assert torch.allclose(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)
    assert not torch.equal(_flat(a), _flat(_model_fit_tensors(x, y)))


def _model_fit_tensors(x, y):
    return pbnn.fit(_model(), x, y, method="map", num_steps=20, seed=0, progress=False)


def test_each_step_takes_the_next_batch_of_the_loader_as_it_is():
    """The loader's batch size, drop_last and sampler are used as they are; N (for the N / B
    scale) is the sampler's length."""
    x, y = _data(23)
    seen = []
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, drop_last=True)
    data = pbnn.data.validate(model, loader)
    pot = pbnn.potential.Potential(model, data)
    real = pot.log_joint

    def spy(z, idx=None, fixed=None, jacobian=True):
        seen.append(idx)
        return real(z, idx, fixed, jacobian)

    pot.log_joint = spy
    pbnn.infer.MAP(num_steps=9, progress=False).fit(pot)
    assert len(data) == 23
    assert [len(b) for b in seen[:9]] == [5] * 9  # drop_last: 4 batches per pass, cycled
    assert torch.equal(seen[4].x, x[:5]) and torch.equal(seen[8].x, x[:5])


def test_a_list_of_batches_is_counted_once():
    x, y = _data(30)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 30, 8)]
    post = pbnn.fit(_model(), batches, method="svi", num_steps=20, seed=0, progress=False)
    assert len(post.data) == 30
    assert post.predict(x[:3]).mean.shape == (3,)


def test_loader_fitted_posterior_predicts_streams_and_saves(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    post = pbnn.fit(_model(), loader, method="svi", num_steps=20, num_samples=8, seed=0, progress=False)
    assert post.log_likelihood().shape == (1, 8, 40)
    assert set(post.to_arviz().groups()) >= {"posterior", "log_likelihood", "observed_data"}
    post.save(tmp_path / "p.pbnn")
    back = pbnn.Posterior.load(tmp_path / "p.pbnn", model=_model())
    assert torch.equal(back.log_likelihood(), post.log_likelihood())


# ----------------------------------------------------------------- full-batch methods
@pytest.mark.parametrize("method", ["hmc", "mh", "laplace"])
def test_full_batch_methods_on_a_loader_agree_with_the_tensor_fit(method, conjugate):
    """HMC / MH concatenate the loader (batches of 8): the same fit as tensors, up to the
    summation order of the log-likelihood. Laplace on one batch of all rows: the same numbers."""
    c = conjugate
    opts = {
        "hmc": {"num_samples": 10, "warmup": 10, "num_chains": 1, "num_leapfrog_steps": 5, "init": "net"},
        "mh": {"num_samples": 30, "warmup": 30, "num_chains": 1, "init": "net"},
        "laplace": {"map_steps": 30, "refine": False},  # a loader's MAP gets no full-batch L-BFGS polish
    }[method]
    a = pbnn.fit(_conjugate_model(c), c["x"], c["y"], method=method, seed=1, progress=False, **opts)
    loader = DataLoader(TensorDataset(c["x"], c["y"]), batch_size=c["x"].shape[0] if method == "laplace" else 8)
    b = pbnn.fit(_conjugate_model(c), loader, method=method, seed=1, progress=False, **opts)
    assert torch.allclose(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hessian", ["ggn", "diag", "kfac"])
def test_laplace_sums_its_curvature_over_one_pass_of_the_loader(hessian, conjugate, monkeypatch):
    """Linear-Gaussian: the curvature is Phi^T Phi / sigma^2 whatever the weights, so Laplace on
    a shuffled loader of batches of 8 (GGN / diagonal / KFAC summed over one pass, nothing
    concatenated: the limit is 100 bytes) gives the tensor fit's covariance, and for the GGN
    and KFAC (exact for a last layer) the conjugate posterior's."""
    c = conjugate
    opts = {"hessian": hessian, "prior_precision": "prior", "map_steps": 50, "seed": 0, "progress": False}
    a = pbnn.fit(_conjugate_model(c), c["x"], c["y"], method="laplace", **opts)
    monkeypatch.setattr(data_mod, "MAX_FULL_BATCH_BYTES", 100)
    loader = DataLoader(TensorDataset(c["x"], c["y"]), batch_size=8, shuffle=True)
    b = pbnn.fit(_conjugate_model(c), loader, method="laplace", **opts)
    x = torch.randn(5, 2)
    var_a, var_b = a.predict(x).epistemic_variance, b.predict(x).epistemic_variance
    assert torch.allclose(var_a, var_b, rtol=1e-4)
    if hessian != "diag":
        phi = torch.cat([x, torch.ones(5, 1)], 1)
        assert torch.allclose(var_b, ((phi @ c["cov"]) * phi).sum(1), rtol=1e-3)
    with pytest.raises(ValueError, match="read 48 rows, not its 50"):
        dropped = DataLoader(TensorDataset(c["x"], c["y"]), batch_size=8, drop_last=True)
        pbnn.fit(_conjugate_model(c), dropped, method="laplace", **opts)


def test_full_batch_method_on_data_over_the_limit_names_the_minibatch_methods(monkeypatch):
    x, y = _data()
    monkeypatch.setattr(data_mod, "MAX_FULL_BATCH_BYTES", 100)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match="MAX_FULL_BATCH_BYTES.*minibatch method.*svi"):
        pbnn.fit(_model(), loader, method="nuts", num_samples=5, warmup=5, progress=False)
    post = pbnn.fit(_model(), loader, method="map", num_steps=5, progress=False)  # minibatch: fine
    with pytest.raises(ValueError, match="MAX_FULL_BATCH_BYTES"):
        post.log_likelihood()


# ----------------------------------------------------------------- errors
def test_generator_is_refused_as_one_shot():
    x, y = _data()
    gen = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8))
    with pytest.raises(TypeError, match="one-shot generator.*read only once"):
        pbnn.fit(_model(), gen, method="map", num_steps=5, progress=False)


def test_batches_that_are_not_pairs_are_refused():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y, y), batch_size=8)
    with pytest.raises(ValueError, match=r"batch 0 of the data is a list of length 3, not an \(x, y\) pair"):
        pbnn.fit(_model(), loader, method="map", num_steps=5, progress=False)


def test_nan_in_a_later_batch_is_named_when_it_is_read():
    x, y = _data()
    x[19, 1] = float("nan")  # in batch 2 of batches of 8
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(
        ValueError, match=r"x of batch 2 of the data contains NaN or inf in 1 row\(s\) \(first: \[3\]\)"
    ):
        pbnn.fit(_model(), loader, method="map", num_steps=10, progress=False)


def test_bad_labels_and_shapes_in_a_later_batch_are_named():
    x = torch.randn(20, 2)
    labels = torch.zeros(20, dtype=torch.long)
    labels[15] = 7
    net = torch.nn.Linear(2, 3)
    model = pbnn.BNN(net, likelihood=pbnn.likelihoods.Categorical())
    with pytest.raises(ValueError, match="batch 1 of the data: .*label"):
        pbnn.fit(model, DataLoader(TensorDataset(x, labels), batch_size=10), method="map", num_steps=4, progress=False)
    batches = [(torch.randn(4, 2), torch.randn(4)), (torch.randn(4, 3), torch.randn(4))]
    with pytest.raises(
        ValueError, match=r"batch 1 of the data: x has rows of shape \(3,\), the first batch had \(2,\)"
    ):
        pbnn.fit(_model(), batches, method="map", num_steps=4, progress=False)


def test_misused_loader_arguments_say_the_fix():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match="pass the loader or Dataset alone"):
        pbnn.fit(_model(), loader, y, method="map")
    with pytest.raises(ValueError, match="drop batch_size="):
        pbnn.fit(_model(), loader, method="map", batch_size=4)
    with pytest.raises(ValueError, match="y is missing"):
        pbnn.fit(_model(), x, method="map")

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    with pytest.raises(TypeError, match="IterableDataset.*DataLoader"):
        pbnn.fit(_model(), Stream(), method="map")
    with pytest.raises(ValueError, match=r"bootstrap=True\) need row indices"):
        pbnn.fit(_model(), loader, method="ensemble", bootstrap=True, num_members=2, num_steps=3, progress=False)


def test_distributed_sampler_is_checked_against_how_the_loader_is_read():
    x, y = _data()
    shard = DataLoader(TensorDataset(x, y), batch_size=8, sampler=DistributedSampler(TensorDataset(x, y), 2, 0))
    with pytest.raises(ValueError, match="DistributedSampler gives this rank only its shard"):
        pbnn.fit(_model(), shard, method="map", num_steps=3, progress=False)
    with pytest.raises(ValueError, match="DistributedSampler gives this rank only its shard"):
        pbnn.fit(_model(), shard, method="nuts", num_samples=3, warmup=3, progress=False)
    with pytest.raises(ValueError, match="sampler=torch.utils.data.DistributedSampler"):
        pbnn.distributed.check_loader(False, split=True)


def _dp_svi(loader, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    return pbnn.fit(pbnn.BNN(net), loader, method="svi", num_steps=30, num_samples=5, seed=3, progress=False, **kw)


def _dp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ds = TensorDataset(*_data(64))
        plain = DataLoader(ds, batch_size=8)
        try:
            _dp_svi(plain, distributed=True)
            refused = ""
        except ValueError as e:
            refused = str(e)
        sharded = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=False))
        post = _dp_svi(sharded, distributed=True)
        torch.save({"mean": post.approximation.q.mean, "refused": refused}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_loader_fit_matches_one_process_on_the_union_of_batches(tmp_path):
    """Two gloo ranks, each reading its DistributedSampler shard in batches of 8, train as one
    process reading batches of 16 (rank 0 takes the even rows, rank 1 the odd ones)."""
    mp.spawn(_dp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = _dp_svi(DataLoader(TensorDataset(*_data(64)), batch_size=16)).approximation.q.mean
    assert torch.equal(r0["mean"], r1["mean"])
    assert torch.allclose(r0["mean"], single, atol=1e-5)
    assert not torch.allclose(
        single, _dp_svi(DataLoader(TensorDataset(*_data(64)), batch_size=8)).approximation.q.mean, atol=1e-3
    )
    assert "sampler=torch.utils.data.DistributedSampler" in r0["refused"]


# ----------------------------------------------------------------- checkpoints
def _ckpt_fit(path, caller_seed=0):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    torch.manual_seed(caller_seed)
    return pbnn.fit(
        _model(), loader, method="svi", num_steps=30, checkpoint_path=path, checkpoint_every=10, progress=False
    )


def test_killed_loader_fit_resumes_bit_identically(tmp_path, monkeypatch):
    """A shuffling loader: the checkpoint holds where the pass began, so the resumed run reads
    the same batches (and the fit's RNG state), whatever the resuming process's own RNG."""
    ref = _ckpt_fit(tmp_path / "ref.pt")
    with monkeypatch.context() as m:
        kill_at(m, 25)  # after the checkpoint of step 19, mid-pass (5 batches per pass)
        with pytest.raises(Killed):
            _ckpt_fit(tmp_path / "k.pt")
    resumed = _ckpt_fit(tmp_path / "k.pt", caller_seed=999)
    assert resumed.info["losses"] == ref.info["losses"]
    assert torch.equal(resumed.approximation.q.mean, ref.approximation.q.mean)
