"""Data-aware decomposition and the calibration statistics behind it: input-channel second moments,
their shrinkage, the output-weighted CP (whiten, decompose, un-whiten), and output sensitivities."""
import pytest
import torch
from torch import nn

from cpkernels import decompose_conv
from cpkernels.compression.calibration import as_batches, input_statistics, output_sensitivity, shrink


def _correlated_covariance(cin, seed=0):
    """Strongly unequal, correlated channels, as after a ReLU stack."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=g, dtype=torch.float64) * torch.logspace(0, -2, cin, dtype=torch.float64)
    return mix @ mix.T + 1e-3 * torch.eye(cin, dtype=torch.float64)


def _weighted_error(factors, weight, covariance, groups=1):
    """||E x_c S^(1/2)|| / ||W x_c S^(1/2)||, computed straight from the definition (trace form)."""
    e = (factors.to(torch.float64).to_dense() - weight.double()).unflatten(0, (groups, -1))
    w = weight.double().unflatten(0, (groups, -1))
    c = weight.shape[1]
    blocks = [covariance[g * c:(g + 1) * c, g * c:(g + 1) * c] for g in range(groups)]
    num = sum(torch.einsum("ocij,cd,odij->", e[g], blocks[g], e[g]) for g in range(groups))
    den = sum(torch.einsum("ocij,cd,odij->", w[g], blocks[g], w[g]) for g in range(groups))
    return float((num / den).sqrt())


@pytest.mark.parametrize("scale", [pytest.param(1.0, id="identity"), pytest.param(3.5, id="scaled-identity")])
def test_identity_covariance_is_the_plain_decomposition(scale):
    w = torch.randn(12, 8, 3, 3)
    plain = decompose_conv(w, 6, random_state=0, n_iter_max=40)
    whitened = decompose_conv(w, 6, random_state=0, n_iter_max=40, input_covariance=scale * torch.eye(8))
    assert all(torch.equal(a, b) for a, b in zip(plain.as_tuple(), whitened.as_tuple()))


@pytest.mark.parametrize("groups", [pytest.param(1, id="dense"), pytest.param(2, id="groups-2")])
def test_whitened_cp_has_the_lower_output_error(groups):
    torch.manual_seed(0)
    w = torch.randn(16, 12 // groups, 3, 3, dtype=torch.float64)
    s = _correlated_covariance(12)
    plain = decompose_conv(w, 8, groups=groups, random_state=0, n_iter_max=80)
    whitened = decompose_conv(w, 8, groups=groups, random_state=0, n_iter_max=80, input_covariance=s)
    assert whitened.input.shape == plain.input.shape
    assert _weighted_error(whitened, w, s, groups) < 0.9 * _weighted_error(plain, w, s, groups)
    assert whitened.relative_error(w) > plain.relative_error(w)  # it spends its accuracy where inputs are


def test_whitened_target_error_is_met_in_the_output_norm():
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    s = _correlated_covariance(12, seed=1)
    f = decompose_conv(w, target_error=0.3, input_covariance=s, random_state=0)
    assert _weighted_error(f, w, s) <= 0.3 + 1e-9


def test_whitening_leaves_the_covariance_and_weight_alone():
    w = torch.randn(8, 6, 3, 3)
    s = _correlated_covariance(6)
    w0, s0 = w.clone(), s.clone()
    decompose_conv(w, 4, input_covariance=s, n_iter_max=5)
    assert torch.equal(w, w0) and torch.equal(s, s0)


@pytest.mark.parametrize(
    "covariance, match",
    [
        pytest.param(torch.eye(5), r"must be a \(6, 6\) tensor", id="wrong-shape"),
        pytest.param(torch.triu(torch.ones(6, 6)), "symmetric", id="not-symmetric"),
        pytest.param(-torch.eye(6), "positive semi-definite", id="negative"),
        pytest.param(torch.full((6, 6), float("nan")), "NaN", id="nan"),
    ],
)
def test_bad_covariance_is_a_clear_error(covariance, match):
    with pytest.raises(ValueError, match=match):
        decompose_conv(torch.randn(8, 6, 3, 3), 4, input_covariance=covariance)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_input_statistics_are_the_channel_second_moments_and_leave_the_model_as_it_was():
    model = _net().train()
    batches = as_batches([torch.randn(4, 3, 6, 6), torch.randn(2, 3, 6, 6)])
    stats = input_statistics(model, batches, {"2": model[2]})
    with torch.no_grad():
        h = torch.cat([model[:2](b[0]) for b in batches])  # [6, 8, 6, 6]
    flat = h.transpose(0, 1).reshape(8, -1).double()
    assert stats["2"].pixels == 6 * 36
    torch.testing.assert_close(stats["2"].covariance, flat @ flat.T / flat.shape[1])
    assert model.training and not model[2]._forward_hooks


def test_shrinkage_ends():
    s = _correlated_covariance(5)
    assert torch.equal(shrink(s, 1.0), torch.eye(5, dtype=s.dtype))
    torch.testing.assert_close(shrink(s, 0.0), s / torch.diagonal(s).mean())
    with pytest.raises(ValueError, match="shrinkage"):
        shrink(s, 1.5)


def test_sensitivity_is_zero_for_a_conv_the_output_ignores():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.used(x) + 0.0 * self.unused(x)

    model = Head()
    convs = {"used": model.used, "unused": model.unused}
    sens = output_sensitivity(model, as_batches([torch.randn(2, 3, 8, 8)]), convs)
    assert sens["unused"] == 0.0
    assert sens["used"] == pytest.approx(1.0, rel=0.05)  # the output is the conv's output plus a constant 0


@pytest.mark.parametrize(
    "calibration, shape, error, match",
    [
        pytest.param(None, None, ValueError, "needs calibration", id="missing"),
        pytest.param([], None, ValueError, "empty", id="empty"),
        pytest.param(torch.randn(2, 3, 6, 6), None, TypeError, "wrap it in a list", id="bare-tensor"),
        pytest.param([torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)], None, ValueError, "batch 1 has shape",
                     id="inconsistent"),
        pytest.param([torch.randn(2, 3, 6, 6)], (1, 4, 6, 6), ValueError, r"batch 0 has shape .*\[N, 4, \.\.\.\]",
                     id="not-the-input-channels"),
        pytest.param(["x"], None, TypeError, "tensor or a tuple", id="not-a-tensor"),
    ],
)
def test_bad_calibration_is_a_clear_error(calibration, shape, error, match):
    with pytest.raises(error, match=match):
        as_batches(calibration, shape)


def test_calibration_may_be_smaller_crops_than_the_input_size():
    """Only the channels must match the input size: the statistics are per channel."""
    crops = [torch.randn(2, 3, 6, 6), torch.randn(1, 3, 6, 6)]
    batches = as_batches(crops, (1, 3, 416, 640))
    assert [b[0] is c for b, c in zip(batches, crops)] == [True, True]
