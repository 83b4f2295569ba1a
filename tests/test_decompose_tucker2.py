"""Tucker-2 decomposition: exactness, TensorLy agreement, rank policies and guards."""
import math
import warnings

import pytest
import torch

from cpkernels import Tucker2Factors, decompose_tucker2
from cpkernels.decompositions.tucker2 import rank_for_fraction, resolve_tucker2_rank
from cpkernels.factors import tucker2_params


@pytest.fixture(scope="module")
def trained_weights():
    """The three conv weights of the digits CNN trained here (1->32, 32->64, 64->128, 3x3)."""
    pytest.importorskip("sklearn")
    from cpkernels.tools.digits import trained_cnn

    model, _ = trained_cnn(epochs=8)
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize(
    "shape, groups",
    [
        pytest.param((12, 8, 3, 3), 1, id="3x3"),
        pytest.param((12, 8, 3, 3), 2, id="groups2"),
        pytest.param((6, 5, 1, 4), 1, id="1x4"),
        pytest.param((6, 1, 3, 3), 6, id="depthwise"),
    ],
)
def test_full_ranks_are_exact(shape, groups):
    w = torch.randn(*shape, dtype=torch.float64)
    f = decompose_tucker2(w, (shape[0] // groups, shape[1]), groups=groups)
    assert f.relative_error(w) < 1e-12
    assert f.rank == (shape[0] // groups, shape[1])


def test_hooi_is_no_worse_than_tensorly_partial_tucker(trained_weights):
    pytest.importorskip("tensorly")
    for w in trained_weights[1:]:
        cout, cin = w.shape[:2]
        for rank in ((cout // 4, cin // 4), (cout // 2, cin // 3)):
            ours = decompose_tucker2(w, rank).relative_error(w)  # our defaults against TensorLy's (tol 1e-4)
            theirs = decompose_tucker2(w, rank, method="tensorly", tol=1e-4).relative_error(w)
            assert ours <= theirs + 1e-9, (tuple(w.shape), rank, ours, theirs)
            assert ours > 0.01  # a real truncation, not an exact case


def test_factors_are_orthonormal_and_the_core_is_the_projection():
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    f = decompose_tucker2(w, (5, 4))
    eye = torch.eye(5, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(f.output[0].T @ f.output[0], eye[0])
    torch.testing.assert_close(f.input[0].T @ f.input[0], eye[1])
    core = torch.einsum("oa,ocij,cb->abij", f.output[0], w, f.input[0])
    torch.testing.assert_close(f.core[0], core)
    # Orthonormal factors: the error is what the core leaves out of the weight's norm.
    expected = math.sqrt(1 - float(core.square().sum() / w.square().sum()))
    assert f.relative_error(w) == pytest.approx(expected, rel=1e-9)


def test_rank_policies():
    shape = (64, 32, 3, 3)
    assert resolve_tucker2_rank((8, 4), shape) == (8, 4)
    assert resolve_tucker2_rank(6, shape) == (6, 6)
    r_out, r_in = resolve_tucker2_rank(0.25, shape)
    dense = math.prod(shape)
    # The stated split: in proportion to the channel counts, the largest within the fraction.
    assert tucker2_params(64, 32, (3, 3), 1, (r_out, r_in)) <= 0.25 * dense
    assert tucker2_params(64, 32, (3, 3), 1, (r_out + 1, r_in + 1)) > 0.25 * dense
    assert abs(r_out / r_in - 2) < 0.2
    assert rank_for_fraction(1.0, shape) == (64, 32) or tucker2_params(64, 32, (3, 3), 1, rank_for_fraction(1.0, shape)) <= dense


@pytest.mark.parametrize(
    "rank, error",
    [
        pytest.param((0, 3), ValueError, id="zero"),
        pytest.param(1.5, ValueError, id="fraction-above-1"),
        pytest.param((2, 3, 4), TypeError, id="triple"),
        pytest.param("4", TypeError, id="string"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param((2.0, 3), TypeError, id="float-pair"),
    ],
)
def test_bad_ranks_are_refused(rank, error):
    with pytest.raises(error):
        decompose_tucker2(torch.randn(8, 4, 3, 3), rank)


def test_over_rank_is_lowered_to_the_exact_decomposition():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="exceeds the channel modes"):
        f = decompose_tucker2(w, (10, 10))
    assert f.rank == (6, 4) and f.relative_error(w) < 1e-12


def test_guards():
    with pytest.raises(ValueError, match="NaN or infinite"):
        decompose_tucker2(torch.full((4, 4, 3, 3), float("nan")), (2, 2))
    zero = torch.zeros(8, 4, 3, 3)
    f = decompose_tucker2(zero, (2, 2))
    assert torch.isfinite(f.core).all() and f.relative_error(zero) == 0.0
    with pytest.raises(ValueError, match="rank .* or a target_error"):
        decompose_tucker2(zero)
    with pytest.raises(ValueError, match="either rank or target_error"):
        decompose_tucker2(zero, (2, 2), target_error=0.1)
    with pytest.raises(ValueError, match="method"):
        decompose_tucker2(zero, (2, 2), method="als")


def test_weight_is_never_modified():
    w = torch.randn(8, 6, 3, 3)
    before = w.clone()
    decompose_tucker2(w, (3, 3), input_covariance=torch.eye(6) * 2 + 0.1)
    assert torch.equal(w, before)


def test_target_error_finds_the_smallest_proportional_ranks(trained_weights):
    w = trained_weights[2]
    f = decompose_tucker2(w, target_error=0.3)
    assert f.relative_error(w) <= 0.3
    from cpkernels.decompositions.tucker2 import proportional_ranks

    k = max(f.rank)
    smaller = decompose_tucker2(w, proportional_ranks(k - 1, w.shape[0], w.shape[1]))
    assert smaller.relative_error(w) > 0.3


def test_input_covariance_minimises_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    mixing = torch.randn(12, 12, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    x = torch.randn(4, 12, 10, 10, dtype=torch.float64)
    x = torch.einsum("dc,nchw->ndhw", mixing, x)  # strongly correlated input channels
    cov = torch.einsum("nchw,ndhw->cd", x, x) / (x.numel() / 12)
    plain = decompose_tucker2(w, (6, 4))
    aware = decompose_tucker2(w, (6, 4), input_covariance=cov)
    conv = torch.nn.functional.conv2d

    def output_error(f):
        return float((conv(x, f.to_dense()) - conv(x, w)).norm() / conv(x, w).norm())

    assert output_error(aware) < 0.7 * output_error(plain)
    # A covariance proportional to the identity is the plain decomposition, bit for bit.
    same = decompose_tucker2(w, (6, 4), input_covariance=3 * torch.eye(12, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(same.as_tuple(), plain.as_tuple()))


def test_factors_validate_their_shapes():
    with pytest.raises(ValueError, match="core's ranks"):
        Tucker2Factors(torch.zeros(1, 4, 2), torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="expects"):
        Tucker2Factors(torch.zeros(4, 2), torch.zeros(1, 2, 2, 3, 3), torch.zeros(1, 4, 2))


def test_tap_weights_fold_the_input_factor_into_the_core():
    f = Tucker2Factors(torch.randn(2, 5, 3), torch.randn(2, 3, 4, 2, 3), torch.randn(2, 6, 4))
    t = f.tap_weights()  # [G, kh*kw, Cin/G, R_out]
    assert t.shape == (2, 6, 6, 3)
    torch.testing.assert_close(t[1, 1 * 3 + 2], f.input[1] @ f.core[1, :, :, 1, 2].T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = f.to_dense()
    torch.testing.assert_close(w[5:].reshape(5, 6, 6), torch.einsum("oa,tca->oct", f.output[1], t[1]))
