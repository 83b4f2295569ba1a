"""The reference backend and the CPU path equal F.conv2d with the reconstructed weight, for every conv semantic."""
import pytest
import torch

from cpkernels import cp_conv2d
from cpkernels.core.conv_args import is_channels_last

from .cases import CONV_CASES
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors


# On CPU tensors, "auto" runs the CPU path (cpkernels/ops/cp_arranged.py); "reference" the four convs.
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("auto", id="cpu-path")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CONV_CASES)
def test_matches_oracle(c, backend):
    factors = random_factors(c.cout, c.cin, c.kernel_size, c.rank, c.groups)
    bias = torch.randn(c.cout) if c.bias else None
    x = c.make_input(torch.float32, "cpu")
    y = cp_conv2d(x, factors, bias, **c.conv_kwargs(), backend=backend)
    expected = oracle_conv2d(x, factors, bias, **c.conv_kwargs())
    assert_matches_oracle(y, expected, torch.float32)
    assert is_channels_last(y) == is_channels_last(x)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float64, id="float64"),
        pytest.param(torch.float32, id="float32"),
        pytest.param(torch.float16, id="float16"),
        pytest.param(torch.bfloat16, id="bfloat16"),
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [pytest.param(2, id="rank2"), pytest.param(6, id="rank6"),
                                  pytest.param(16, id="rank16")])  # the CPU path's three arrangements
def test_dtypes(dtype, layout, backend, rank):
    factors = random_factors(12, 10, (3, 3), rank, dtype=dtype)
    bias = torch.randn(12, dtype=dtype)
    x = torch.randn(2, 10, 9, 8, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = cp_conv2d(x, factors, bias, padding=1, backend=backend)
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, padding=1), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaves_inputs_untouched(backend):
    factors = random_factors(6, 8, (3, 3), 4)
    x = torch.randn(2, 8, 9, 9)
    before = [t.clone() for t in (x, *factors.as_tuple())]
    cp_conv2d(x, factors, padding=1, padding_mode="reflect", backend=backend)
    for t, b in zip((x, *factors.as_tuple()), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize(
    "groups, bias, padding, pixel_major",
    [
        pytest.param(1, True, 1, False, id="bias"),
        pytest.param(1, False, (0, 1), False, id="no-bias"),
        pytest.param(2, True, "same", False, id="groups2"),
        pytest.param(1, True, 1, True, id="pixel-major-bias"),
        pytest.param(1, False, "same", True, id="pixel-major-no-bias"),
    ],
)
def test_cpu_path_in_batch_chunks(monkeypatch, groups, bias, padding, pixel_major):
    """Inference runs big NCHW batches in chunks written into one output: force a chunk per image."""
    from cpkernels.dispatch import cpu as cpu_dispatch

    monkeypatch.setattr(cpu_dispatch, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu_dispatch, "PIXEL_MAJOR_MIN_RANK", 1 if pixel_major else 1 << 30)
    factors = random_factors(6, 8, (3, 3), 4, groups)
    b = torch.randn(6) if bias else None
    x = torch.randn(3, 8, 9, 10)
    with torch.no_grad():
        y = cp_conv2d(x, factors, b, padding=padding, backend="auto")
    assert_matches_oracle(y, oracle_conv2d(x, factors, b, padding=padding), torch.float32)
    # With gradients wanted, the whole batch runs at once (out= writes have no autograd).
    factors_grad = type(factors)(*(f.clone().requires_grad_() for f in factors.as_tuple()))
    y_grad = cp_conv2d(x, factors_grad, b, padding=padding, backend="auto")
    assert y_grad.requires_grad
    torch.testing.assert_close(y_grad.detach(), y, rtol=1e-5, atol=1e-6)


# The CPU path picks, per call, among exact ways of computing the layer (cpkernels/ops/cp_arranged.py). Each is
# forced here over every conv case, and spies prove the forced branch ran.
CPU_BRANCHES = [
    pytest.param("nchw-intermediates", id="nchw-intermediates"),
    pytest.param("pixel-major-intermediates", id="pixel-major-intermediates"),
    pytest.param("im2col-depthwise", id="im2col-depthwise"),
    pytest.param("dense-weight", id="dense-weight"),
]
_SPIED = ("merged_depthwise_weight", "im2col_depthwise", "pointwise_to_pixel_major", "cp_conv2d_dense_weight")


def _force_cpu_branch(monkeypatch, branch) -> list:
    """Force ``branch``; returns a list that records which of the CPU path's helpers ran."""
    from cpkernels.dispatch import cpu as cpu_dispatch
    from cpkernels.ops import cp_arranged

    ran = []
    monkeypatch.setattr(cpu_dispatch, "dense_is_cheaper", lambda *args: branch == "dense-weight")
    monkeypatch.setattr(cpu_dispatch, "IM2COL_MAX_CHANNELS", 1 << 30 if branch == "im2col-depthwise" else 0)
    monkeypatch.setattr(cpu_dispatch, "IM2COL_MAX_BYTES", 1 << 62)
    monkeypatch.setattr(cpu_dispatch, "PIXEL_MAJOR_MIN_RANK", 1 if branch == "pixel-major-intermediates" else 1 << 30)
    for name in _SPIED:
        original = getattr(cp_arranged, name)
        monkeypatch.setattr(cp_arranged, name, lambda *args, _f=original, _n=name: ran.append(_n) or _f(*args))
    return ran


@pytest.mark.parametrize("branch", CPU_BRANCHES)
@pytest.mark.parametrize("c", CONV_CASES)
def test_cpu_path_branches_match_oracle(monkeypatch, c, branch):
    nchw_input = c.layout != "channels_last"  # channels_last inputs keep 1x1 and grouped convs
    if branch == "im2col-depthwise" and not ((nchw_input or c.groups == 1) and c.dilation in (1, (1, 1))):
        pytest.skip("the im2col depthwise conv runs at dilation 1, and on channels_last inputs without groups")
    if branch == "pixel-major-intermediates" and not (nchw_input and c.groups == 1):
        pytest.skip("pixel-major intermediates are for NCHW inputs without groups")
    ran = _force_cpu_branch(monkeypatch, branch)
    factors = random_factors(c.cout, c.cin, c.kernel_size, c.rank, c.groups)
    bias = torch.randn(c.cout) if c.bias else None
    x = c.make_input(torch.float32, "cpu")
    y = cp_conv2d(x, factors, bias, **c.conv_kwargs(), backend="auto")
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, **c.conv_kwargs()), torch.float32)
    assert is_channels_last(y) == is_channels_last(x)
    assert ("merged_depthwise_weight" in ran) == (branch != "dense-weight")
    assert ("cp_conv2d_dense_weight" in ran) == (branch == "dense-weight")
    assert ("im2col_depthwise" in ran) == (branch == "im2col-depthwise")
    if branch == "pixel-major-intermediates":
        assert "pointwise_to_pixel_major" in ran
    if branch == "nchw-intermediates":
        assert "pointwise_to_pixel_major" not in ran


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16"),
     pytest.param(torch.float64, id="float64")],
)
def test_im2col_depthwise_dtypes_and_grads(monkeypatch, dtype):
    """Rank 1 and 2 (groups 2 at rank 1): the default policy takes the im2col conv; it is differentiable."""
    ran = _force_cpu_branch(monkeypatch, "im2col-depthwise")
    for groups, rank in ((1, 1), (1, 2), (2, 1)):
        factors = random_factors(4, 6, (3, 5), rank, groups, dtype=dtype)
        bias = torch.randn(4, dtype=dtype)
        x = torch.randn(2, 6, 9, 10, dtype=dtype)
        y = cp_conv2d(x, factors, bias, stride=(2, 1), padding=(1, 2), backend="auto")
        assert_matches_oracle(y, oracle_conv2d(x, factors, bias, stride=(2, 1), padding=(1, 2)), dtype)
    assert ran.count("im2col_depthwise") == 3
    if dtype == torch.float64:
        leaves = [t.clone().requires_grad_() for t in (x, *factors.as_tuple(), bias)]

        def f(x, *rest):
            return cp_conv2d(x, type(factors)(*rest[:4]), rest[4], stride=(2, 1), padding=(1, 2), backend="auto")

        assert torch.autograd.gradcheck(f, leaves)


def test_cpu_policy():
    """Where the CPU path's choices land, on shapes it was measured on."""
    from cpkernels.dispatch import cpu

    def t(n, c, hw):
        return torch.empty(n, c, hw, hw, device="meta")

    # im2col depthwise: rank <= 2, dilation 1, column buffer under the cap.
    assert cpu.depthwise_by_im2col(8, 1, (5, 5), (28, 28), (1, 1), 4)
    assert cpu.depthwise_by_im2col(8, 2, (3, 3), (56, 56), (1, 1), 4)
    assert not cpu.depthwise_by_im2col(8, 4, (3, 3), (32, 32), (1, 1), 4)
    assert not cpu.depthwise_by_im2col(8, 1, (3, 3), (30, 30), (2, 2), 4)
    assert not cpu.depthwise_by_im2col(8, 1, (5, 5), (224, 224), (1, 1), 4)
    # Dense with the reconstructed weight: never for tiny layers, and for few-input-channel layers at a
    # rank that saves few MACs (3->64 at rank 16: 1.4x fewer MACs, 2x the bytes).
    assert not cpu.dense_is_cheaper(t(8, 3, 32), 1, 1, 2, (5, 5), (28, 28))
    assert cpu.dense_is_cheaper(t(8, 3, 64), 16, 1, 64, (3, 3), (64, 64))
    assert not cpu.dense_is_cheaper(t(8, 3, 64), 2, 1, 64, (3, 3), (64, 64))
    assert not cpu.dense_is_cheaper(t(8, 128, 56), 32, 1, 128, (3, 3), (56, 56))
    # Trained-network ranks: a stride-2 layer at R = 1.25 C (1.4x fewer MACs, R > C intermediates at the
    # input's resolution) measured slower than dense; at R = C it measured faster.
    assert cpu.dense_is_cheaper(t(8, 128, 56), 160, 1, 128, (3, 3), (28, 28))
    assert not cpu.dense_is_cheaper(t(8, 128, 56), 128, 1, 128, (3, 3), (28, 28))
    # The whole plan: arrangement and batch chunk.
    cl = t(8, 128, 56).to(memory_format=torch.channels_last)
    assert cpu.plan(t(8, 3, 32), 1, 1, 2, (5, 5), (28, 28), (1, 1), False) == cpu.Plan("im2col", 8)
    assert cpu.plan(t(8, 128, 56), 32, 1, 128, (3, 3), (56, 56), (1, 1), False) == cpu.Plan("pixel-major", 8)
    assert cpu.plan(t(8, 128, 112), 32, 1, 128, (3, 3), (112, 112), (1, 1), False) == cpu.Plan("pixel-major", 5)
    assert cpu.plan(t(8, 128, 112), 32, 1, 128, (3, 3), (112, 112), (1, 1), True) == cpu.Plan("pixel-major", 8)
    assert cpu.plan(t(8, 128, 56), 8, 1, 128, (3, 3), (56, 56), (1, 1), False).arrangement == "nchw"
    assert cpu.plan(t(8, 128, 56), 32, 2, 128, (3, 3), (56, 56), (1, 1), False).arrangement == "nchw"
    assert cpu.plan(cl, 32, 1, 128, (3, 3), (56, 56), (1, 1), False).arrangement == "channels-last-convs"
    assert cpu.plan(t(8, 3, 64), 16, 1, 64, (3, 3), (64, 64), (1, 1), False).arrangement == "dense-weight"


@pytest.mark.parametrize("branch", CPU_BRANCHES)
def test_cpu_path_branches_gradcheck(monkeypatch, branch):
    """Training runs the CPU path's branches as plain torch ops: their gradients, in float64."""
    ran = _force_cpu_branch(monkeypatch, branch)
    factors = random_factors(4, 6, (3, 2), 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (torch.randn(2, 6, 6, 7, dtype=torch.float64),
                                                   *factors.as_tuple(), torch.randn(4, dtype=torch.float64))]

    def f(x, *rest):
        return cp_conv2d(x, type(factors)(*rest[:4]), rest[4], stride=(2, 1), padding=(1, 0), backend="auto")

    assert torch.autograd.gradcheck(f, leaves)
    assert ("merged_depthwise_weight" in ran) == (branch != "dense-weight")
