"""Parity at real sizes on a GPU, including a tensor past 2**31 elements (skipped without CUDA)."""
import pytest
import torch

from cpkernels import cp_conv2d

from .oracle import assert_matches_oracle, oracle_conv2d, random_factors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cin, cout, size, rank, batch, layout",
    [
        pytest.param(256, 256, 56, 64, 8, "nchw", id="256-56-r64"),
        pytest.param(256, 256, 56, 128, 8, "channels_last", id="256-56-r128-cl"),
        pytest.param(512, 512, 28, 256, 8, "nchw", id="512-28-r256-sliced"),
        pytest.param(64, 64, 224, 16, 4, "channels_last", id="64-224-r16-cl"),
    ],
)
def test_real_sizes_match_oracle(cin, cout, size, rank, batch, layout, dtype):
    factors = random_factors(cout, cin, (3, 3), rank, dtype=dtype, device="cuda")
    bias = torch.randn(cout, dtype=dtype, device="cuda")
    x = torch.randn(batch, cin, size, size, dtype=dtype, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = cp_conv2d(x, factors, bias, padding=1, backend="triton")
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, padding=1), dtype)


def test_fp32_follows_pytorchs_tf32_switch():
    """With torch.backends.cudnn.allow_tf32 on (PyTorch's default) fp32 dots run as TF32."""
    factors = random_factors(256, 256, (3, 3), 64, device="cuda")
    x = torch.randn(4, 256, 28, 28, device="cuda")
    expected = oracle_conv2d(x, factors, None, padding=1)
    torch.backends.cudnn.allow_tf32 = True
    y = cp_conv2d(x, factors, None, padding=1, backend="triton")
    assert_matches_oracle(y, expected, torch.float32, tolerance_key="tf32")


def test_input_past_int32_elements():
    """2**31 + elements: the 64-bit offset path, checked on the first and the last images."""
    n, c, h, w = 2049, 16, 256, 256  # 2.15e9 elements, 4.3 GB in bf16
    assert n * c * h * w > 2**31 - 1
    factors = random_factors(8, c, (3, 3), 8, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(n, c, h, w, dtype=torch.bfloat16, device="cuda")
    y = cp_conv2d(x, factors, None, padding=1, backend="triton")
    for idx in (slice(0, 1), slice(n - 1, n)):
        assert_matches_oracle(y[idx], oracle_conv2d(x[idx], factors, None, padding=1), torch.bfloat16)
