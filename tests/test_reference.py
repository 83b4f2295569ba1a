"""The reference backend and the CPU path equal F.conv2d with the reconstructed weight, for every conv semantic."""
import pytest
import torch

from cpkernels import cp_conv2d
from cpkernels.ops.conv_args import is_channels_last

from .cases import CONV_CASES
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors


# On CPU tensors, "auto" runs the CPU path (cpkernels/ops/cpu.py); "reference" the four convs.
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
def test_dtypes(dtype, layout, backend):
    factors = random_factors(12, 10, (3, 3), 6, dtype=dtype)
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
    "groups, bias, padding",
    [
        pytest.param(1, True, 1, id="bias"),
        pytest.param(1, False, (0, 1), id="no-bias"),
        pytest.param(2, True, "same", id="groups2"),
    ],
)
def test_cpu_path_in_batch_chunks(monkeypatch, groups, bias, padding):
    """Inference runs big NCHW batches in chunks written into one output: force a chunk per image."""
    from cpkernels.ops import cpu

    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
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
