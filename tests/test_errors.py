import pytest
import torch

import pbnn
from pbnn.core.data import Data, FitWarning, scale_warning
from pbnn.infer.base import baseline_warning, loss_warning, stuck_chain_warning


@pytest.fixture
def reg_model(make_net):
    return pbnn.BNN(make_net())


def test_nan_and_inf(reg_model):
    x, y = torch.randn(10, 1), torch.randn(10)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf.*first: \\[3\\]"):
        pbnn.fit(reg_model, x, y, method="map", num_steps=5, progress=False)
    y[2] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        pbnn.fit(reg_model, torch.randn(10, 1), y, method="map", num_steps=5, progress=False)


def test_length_mismatch_and_empty(reg_model):
    with pytest.raises(ValueError, match="len\\(x\\) = 10, len\\(y\\) = 9"):
        pbnn.fit(reg_model, torch.randn(10, 1), torch.randn(9), method="map")
    with pytest.raises(ValueError, match="empty"):
        pbnn.fit(reg_model, torch.randn(0, 1), torch.randn(0), method="map")


def test_label_errors(make_net):
    model = pbnn.BNN(make_net(out=3), likelihood=pbnn.likelihoods.Categorical())
    x = torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[0, 5\]"):
        pbnn.fit(model, x, torch.tensor([0, 1, 2, 5]), method="map")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        pbnn.fit(model, x, torch.tensor([0, -1, 2, 1]), method="map")
    with pytest.raises(ValueError, match="integer"):
        pbnn.fit(model, x, torch.tensor([0.0, 1.0, 2.0, 1.0]), method="map")
    with pytest.raises(ValueError, match="integers"):
        pbnn.fit(model, x, torch.tensor([0.5, 1.0, 2.0, 1.0]), method="map")


def test_unknown_method_and_option(reg_model):
    x, y = torch.randn(5, 1), torch.randn(5)
    with pytest.raises(ValueError, match="unknown method 'nutz'.*map.*svi"):
        pbnn.fit(reg_model, x, y, method="nutz")
    with pytest.raises(ValueError, match="bad option for method 'svi'"):
        pbnn.fit(reg_model, x, y, method="svi", num_stepz=3)
    with pytest.raises(ValueError, match="unknown guide"):
        pbnn.fit(reg_model, x, y, method="svi", guide="flow")
    with pytest.raises(ValueError, match="options"):
        pbnn.fit(reg_model, x, y, method=pbnn.infer.SVI(), num_steps=3)


def test_wrong_input_width(reg_model):
    with pytest.raises(ValueError, match="cannot take x of shape"):
        pbnn.fit(reg_model, torch.randn(5, 3), torch.randn(5), method="map")


def test_divergent_fit_is_reported(reg_model):
    x, y = torch.randn(20, 1), 1e20 * torch.randn(20)
    with pytest.raises(ValueError, match="became"), pytest.warns(FitWarning, match="far from standardised"):
        pbnn.fit(reg_model, x, y, method="map", num_steps=50, lr=1e6, progress=False)


def test_svi_with_a_huge_learning_rate_names_the_fix():
    """NaN guide parameters fail inside torch's constraint check: pbnn says what happened and the fix."""
    torch.manual_seed(0)
    x = torch.randn(50, 1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with pytest.raises(ValueError, match=r"parameters became NaN or inf at step \d+; lower the learning rate") as err:
        pbnn.fit(pbnn.BNN(net), x, torch.sin(x[:, 0]), method="svi", lr=10, num_steps=300, progress=False, seed=0)
    assert "Parameter containing" not in str(err.value)  # no tensor dump


# ----------------------------------------------------------------------------- issue 27: inputs and useless fits
def test_one_dimensional_x_names_the_fix():
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    for n in (10, 1):  # n = 1 used to pass validation: Linear(1, 4) took the one row as a feature
        x = torch.randn(n)
        with pytest.raises(ValueError, match=rf"x is 1-D.*pass x\[:, None\] \(shape \[{n}, 1\]\)"):
            pbnn.fit(pbnn.BNN(net), x, x, method="map", num_steps=5, progress=False)


def test_net_that_drops_the_batch_dimension_is_refused():
    class Sum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x):
            return self.lin(x).sum(0)  # one output for the whole batch

    with pytest.raises(ValueError, match=r"maps 2 rows.*to output \(1,\).*first dimension must be the batch"):
        pbnn.fit(pbnn.BNN(Sum()), torch.randn(6, 2), torch.randn(6), method="map", num_steps=5, progress=False)


def test_far_from_standardised_data_warns_with_the_numbers_and_the_fix(make_net):
    x = torch.linspace(-1, 1, 20)[:, None]
    with pytest.warns(FitWarning, match=r"targets y \(\|mean\| up to 1e\+06.*Standardise"):
        pbnn.fit(pbnn.BNN(make_net()), x, 1e6 + x[:, 0], method="map", num_steps=5, progress=False)
    with pytest.warns(FitWarning, match=r"inputs x \(std up to 6.23e\+05\).*Standardise"):
        pbnn.fit(pbnn.BNN(make_net()), 1e6 * x, x[:, 0], method="map", num_steps=5, progress=False)
    with pytest.warns(FitWarning, match=r"targets y \(std down to 0.00623\)"):
        pbnn.fit(pbnn.BNN(make_net()), x, 0.01 * x[:, 0], method="map", num_steps=5, progress=False)
    assert scale_warning(pbnn.BNN(make_net()), Data(x, x[:, 0])) is None  # standardised: silent
    labels = pbnn.BNN(make_net(out=3), likelihood=pbnn.likelihoods.Categorical())
    assert scale_warning(labels, Data(x, torch.arange(20) % 3 * 20)) is None  # labels are not scaled
    assert scale_warning(pbnn.BNN(make_net()), Data(torch.cat([x, torch.ones(20, 1)], 1), x[:, 0])) is None


def test_loss_that_rose_warns():
    falling = list(torch.linspace(2.0, 1.0, 100) + 0.05 * torch.randn(100, generator=torch.Generator().manual_seed(0)))
    assert loss_warning([float(v) for v in falling], "SVI") is None
    assert loss_warning([2.0, 3e6, 272.0] + [1.9] * 97, "MAP") is None  # a spike, then below the start
    assert loss_warning([1.0] * 10, "MAP") is None  # too short to judge
    with pytest.warns(FitWarning, match=r"MAP: the training loss ended above.*1\b.*, of the last 10 3\b.*lr"):
        assert loss_warning([1.0] * 50 + [3.0] * 50, "MAP")
    with pytest.warns(FitWarning, match="ended above"):  # a [steps, members] table
        loss_warning(torch.cat([torch.ones(30, 2), 5 * torch.ones(30, 2)]).tolist(), "ensemble")


def test_chains_that_never_moved_warn(make_net):
    x = torch.linspace(-1, 1, 20)[:, None]
    with pytest.warns(FitWarning, match=r"HMC: 2 of 2 chain\(s\) never moved.*0.0% of 9 transitions.*step size"):
        pbnn.fit(
            pbnn.BNN(make_net()), x, torch.sin(3 * x[:, 0]), method="hmc", num_samples=10, warmup=0, num_chains=2,
            step_size=50.0, adapt_step_size=False, map_steps=5, progress=False, seed=0,
        )  # fmt: skip
    moving = torch.randn(2, 10, 3)
    assert stuck_chain_warning(moving, "MH") is None
    moving[1] = moving[1, :1]
    with pytest.warns(FitWarning, match=r"MH: 1 of 2 chain\(s\) never moved \(chains \[1\]"):
        stuck_chain_warning(moving, "MH")


def test_fit_worse_than_the_mean_warns():
    """The issue's MAP with lr=10: 16x worse than predicting the mean of y; a good fit is silent."""
    from pbnn.datasets import gap_regression

    d = gap_regression()

    def fit(lr):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
        return pbnn.fit(pbnn.BNN(net), d["x_train"], d["y_train"], method="map", lr=lr, progress=False, seed=0)

    with pytest.warns(FitWarning, match="worse than their mean does"):
        fit(10.0)
    post = fit(0.01)
    potential = pbnn.potential.Potential(post.model, post.data)
    assert baseline_warning(post, potential, "map") is None
