import pytest
import torch

import pbnn


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
    with pytest.raises(ValueError, match="became"):
        pbnn.fit(reg_model, x, y, method="map", num_steps=50, lr=1e6, progress=False)
