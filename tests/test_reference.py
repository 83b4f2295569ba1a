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
