"""decompose_conv: exactness, rank policies, guards, determinism, and parity with a direct parafac."""
import warnings

import pytest
import tensorly
import torch
from tensorly.decomposition import parafac

from cpkernels import CPConv2d, CPFactors, decompose_conv, resolve_rank

from .oracle import random_factors


def test_exact_recovery_of_a_rank_r_weight():
    torch.manual_seed(1)
    truth = random_factors(16, 12, (3, 3), 5, dtype=torch.float64)
    factors = decompose_conv(truth.to_dense(), 5, n_iter_max=500, tol=1e-14)
    assert factors.relative_error(truth.to_dense()) < 1e-6


def test_exact_recovery_per_group():
    truth = random_factors(8, 6, (3, 3), 3, groups=2, dtype=torch.float64)
    factors = decompose_conv(truth.to_dense(), 3, groups=2, n_iter_max=500, tol=1e-14)
    assert factors.groups == 2
    assert factors.output.shape == (2, 4, 3) and factors.input.shape == (2, 3, 3)
    assert factors.relative_error(truth.to_dense()) < 1e-6


@pytest.mark.parametrize(
    "cin, cout, k, rank, params, dense",
    [
        pytest.param(3, 2, (5, 5), 2, 30, 150, id="conv-3-2-5x5-rank2"),
        pytest.param(3, 64, (3, 3), 16, 1168, 1728, id="vgg19-first-layer-rank16"),
    ],
)
def test_seed_examples_parameter_counts(cin, cout, k, rank, params, dense):
    conv = torch.nn.Conv2d(cin, cout, k, bias=False)
    layer = CPConv2d.from_conv(conv, rank)
    assert layer.factors.num_params == params
    assert layer.factors.dense_num_params == dense
    assert sum(p.numel() for p in layer.parameters()) == params


def test_factor_shapes_and_dtype_follow_the_weight():
    w = torch.randn(6, 4, 3, 2, dtype=torch.float32)
    f = decompose_conv(w, 3)
    assert isinstance(f, CPFactors)
    assert [tuple(t.shape) for t in f.as_tuple()] == [(1, 6, 3), (1, 4, 3), (1, 3, 3), (1, 2, 3)]
    assert f.dtype == torch.float32 and f.rank == 3 and f.groups == 1
    assert f.to_dense().shape == w.shape


def test_weight_is_not_modified():
    w = torch.randn(6, 4, 3, 3)
    before = w.clone()
    decompose_conv(w, 3)
    assert torch.equal(w, before)


def test_same_seed_same_factors_and_seed_matters():
    w = torch.randn(8, 6, 3, 3)
    a = decompose_conv(w, 4, init="random", random_state=3)
    b = decompose_conv(w, 4, init="random", random_state=3)
    c = decompose_conv(w, 4, init="random", random_state=4)
    assert all(torch.equal(x, y) for x, y in zip(a.as_tuple(), b.as_tuple()))
    assert not all(torch.equal(x, y) for x, y in zip(a.as_tuple(), c.as_tuple()))


@pytest.mark.parametrize(
    "shape, rank, init, l2_reg",
    [
        pytest.param((16, 8, 3, 3), 6, "svd", 0.0, id="svd"),
        pytest.param((16, 8, 3, 3), 6, "random", 0.0, id="random"),
        pytest.param((12, 10, 5, 5), 20, "svd", 0.0, id="5x5-over-kernel-rank"),
        pytest.param((16, 8, 3, 1), 4, "svd", 1e-3, id="kx1-l2-reg"),
        pytest.param((32, 24, 3, 3), 16, "random", 0.0, id="larger"),
    ],
)
@pytest.mark.parametrize("method", ["als", "parafac"])
def test_quality_at_least_direct_parafac(shape, rank, init, l2_reg, method):
    """Same rank, init, seed and iteration budget: at least TensorLy's parafac."""
    w = torch.randn(shape, dtype=torch.float64)
    ours = decompose_conv(w, rank, init=init, random_state=0, n_iter_max=50, l2_reg=l2_reg, method=method)
    with tensorly.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, factors = parafac(w, rank, init=init, random_state=0, n_iter_max=50, tol=1e-8, l2_reg=l2_reg)
    direct = torch.einsum("r,or,cr,ir,jr->ocij", weights, *factors)
    direct_error = float(torch.linalg.vector_norm(w - direct) / torch.linalg.vector_norm(w))
    assert ours.relative_error(w) <= direct_error * (1 + 1e-9)


def test_cp_weights_are_folded_into_the_output_factor(monkeypatch):
    """If parafac returns non-unit CP weights, they must end up in the product, not be dropped."""
    import tensorly.decomposition

    real = tensorly.decomposition.parafac

    def normalizing_parafac(*args, **kwargs):
        kwargs["normalize_factors"] = True
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorly.decomposition, "parafac", normalizing_parafac)
    truth = random_factors(8, 6, (3, 3), 3, dtype=torch.float64)
    f = decompose_conv(truth.to_dense() * 50.0, 3, n_iter_max=500, tol=1e-14, method="parafac")
    assert f.relative_error(truth.to_dense() * 50.0) < 1e-6


# Rank policies -----------------------------------------------------------------------------------
def test_fractional_rank_is_that_fraction_of_parameters():
    shape = (64, 64, 3, 3)
    r = resolve_rank(0.25, shape)
    per_rank = 64 + 64 + 3 + 3
    assert r == int(0.25 * 64 * 64 * 9 // per_rank)
    assert r * per_rank <= 0.25 * 64 * 64 * 9 < (r + 1) * per_rank


def test_target_error_gives_the_smallest_rank_reaching_it():
    truth = random_factors(12, 10, (3, 3), 7, dtype=torch.float64)
    w = truth.to_dense()
    f = decompose_conv(w, None, target_error=1e-4, n_iter_max=300, tol=1e-12)
    assert f.relative_error(w) <= 1e-4
    assert f.rank == 7  # a rank-7 weight is not approximated to 1e-4 by rank 6


def test_target_error_unreachable_warns_and_returns_the_cap():
    w = torch.randn(4, 2, 3, 3)
    with pytest.warns(UserWarning, match="no rank up to"):
        f = decompose_conv(w, None, target_error=1e-12, n_iter_max=20)
    assert f.num_params < w.numel()


@pytest.mark.parametrize(
    "rank, error",
    [
        pytest.param(0, ValueError, id="rank-0"),
        pytest.param(-3, ValueError, id="negative-rank"),
        pytest.param(0.0, ValueError, id="fraction-0"),
        pytest.param(1.5, ValueError, id="fraction-above-1"),
        pytest.param(float("nan"), ValueError, id="fraction-nan"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param("8", TypeError, id="string"),
    ],
)
def test_bad_ranks_are_rejected(rank, error):
    with pytest.raises(error):
        decompose_conv(torch.randn(6, 4, 3, 3), rank)


def test_als_tracks_its_error_and_warm_starts():
    from cpkernels.decompositions.als import cp_als

    w = torch.randn(10, 8, 3, 3, dtype=torch.float64)
    factors, errors = cp_als(w, 5, n_iter_max=30, tol=0)
    true_error = float(torch.linalg.vector_norm(w - torch.einsum("or,cr,ir,jr->ocij", *factors)) / w.norm())
    assert len(errors) == 30 and errors[-1] == pytest.approx(true_error, rel=1e-9)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))  # ALS never increases the error
    _, warm = cp_als(w, 5, n_iter_max=5, tol=0, init_factors=factors)
    assert warm[0] <= errors[-1] * (1 + 1e-9)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        decompose_conv(torch.randn(4, 4, 3, 3), 2, method="hosvd")


def test_rank_and_target_error_together_is_an_error():
    with pytest.raises(ValueError, match="either rank or target_error"):
        decompose_conv(torch.randn(6, 4, 3, 3), 3, target_error=0.1)


# Guards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_rejected(bad):
    w = torch.randn(6, 4, 3, 3)
    w[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        decompose_conv(w, 3)


def test_all_zero_weight_gives_exact_zero_factors():
    f = decompose_conv(torch.zeros(6, 4, 3, 3), 3)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in f.as_tuple())
    assert f.relative_error(torch.zeros(6, 4, 3, 3)) == 0.0


def test_rank_not_saving_parameters_warns():
    with pytest.warns(UserWarning, match="saves nothing"):
        decompose_conv(torch.randn(4, 2, 3, 3), 8, n_iter_max=5)


@pytest.mark.parametrize(
    "shape, rank",
    [
        pytest.param((6, 1, 1, 2), 5, id="svd-init-width-mismatch"),
        pytest.param((1, 2, 2, 2), 6, id="singular-als"),
        pytest.param((16, 1, 3, 3), 4, id="one-input-channel"),
    ],
)
def test_tiny_and_over_ranked_weights_decompose(shape, rank):
    w = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = decompose_conv(w, rank)
    assert all(torch.isfinite(t).all() for t in f.as_tuple())
    assert f.relative_error(w) < 1.0  # better than the all-zero approximation


def test_factors_to_and_repr():
    f = decompose_conv(torch.randn(6, 4, 3, 3), 3)
    g = f.to(torch.float64)
    assert g.dtype == torch.float64 and f.dtype == torch.float32
    assert "rank=3" in repr(f)


def test_factors_convert_to_a_tensorly_cptensor():
    import tensorly

    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    f = decompose_conv(w, 4, groups=2)
    cp = f.to_cptensor(group=1)
    with tensorly.backend_context("pytorch"):
        dense = tensorly.cp_to_tensor(cp)
    torch.testing.assert_close(dense, f.to_dense()[4:])


def test_strongest_terms_keeps_the_largest_rank_one_terms():
    from cpkernels.decompositions.cp import strongest_terms

    f = random_factors(6, 4, (3, 3), 5, groups=2, dtype=torch.float64)
    scale = torch.tensor([1.0, 10.0, 0.1, 5.0, 2.0], dtype=torch.float64)
    f = CPFactors(f.output * scale, f.input, f.vertical, f.horizontal)
    kept = strongest_terms(f, 3)
    assert kept.rank == 3 and kept.groups == 2
    norms = lambda g: torch.stack([torch.linalg.vector_norm(t, dim=1) for t in g.as_tuple()]).prod(0)  # noqa: E731
    assert torch.equal(norms(kept).sort(dim=1).values, norms(f).sort(dim=1).values[:, 2:])


def test_cancellation_of_the_terms():
    """Sum of the rank-one terms' norms over the weight's norm: 1 for one term, by hand for two, inf for
    terms that cancel exactly."""
    a, b, v, h = (torch.randn(1, n, 1, dtype=torch.float64) for n in (4, 3, 2, 2))
    one = CPFactors(a, b, v, h)
    assert one.cancellation() == pytest.approx(1.0)
    pair = CPFactors(torch.cat([a, -0.5 * a], -1), *(torch.cat([t, t], -1) for t in (b, v, h)))
    assert pair.cancellation() == pytest.approx(1.5 / 0.5)  # terms of norms 1 and 0.5 (x ||w||), sum 0.5
    exact = CPFactors(torch.cat([a, -a], -1), *(torch.cat([t, t], -1) for t in (b, v, h)))
    assert exact.cancellation() == float("inf")
    assert CPFactors(*(torch.zeros_like(t) for t in (a, b, v, h))).cancellation() == 1.0


@pytest.mark.parametrize(
    "shape, rank",
    [pytest.param((3, 4, 2, 1), 6, id="conv-4-3-2x1-at-6"), pytest.param((6, 1, 1, 2), 5, id="6-1-1x2-at-5"),
     pytest.param((2, 3, 3, 3), 20, id="2-3-3x3-at-20")],
)
def test_over_ranked_weights_get_the_exact_decomposition(shape, rank):
    """At a rank where an exact CP is known (one term per index of the three smaller modes), that one is
    built: exact, and no term larger than the weight (ALS returned a term 600x the weight's norm for the
    first case)."""
    from cpkernels.decompositions.cp import exact_rank

    weight = torch.randn(shape, dtype=torch.float64)
    assert rank >= exact_rank(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # such ranks save no parameters, and say so
        factors = decompose_conv(weight, rank)
    assert factors.rank == rank
    assert factors.relative_error(weight) < 1e-12
    norms = [torch.linalg.vector_norm(f, dim=1) for f in factors.as_tuple()]
    assert float((norms[0] * norms[1] * norms[2] * norms[3]).max()) <= float(weight.norm()) * (1 + 1e-12)
    assert factors.cancellation() <= exact_rank(shape) ** 0.5 + 1e-9
