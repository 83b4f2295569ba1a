"""The float64 oracle and the one per-dtype tolerance table every test compares with."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cpkernels import CPFactors, Tucker2Factors

# Largest error allowed, relative to the largest |value| of the oracle's output. "tf32": float32
# tensors computed with TF32 dots (10-bit mantissa inputs, fp32 accumulation).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    "tf32": 5e-3,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def oracle_conv2d(
    x: Tensor,
    factors: CPFactors,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``nn.Conv2d`` in float64 with the reconstructed weight: PyTorch's own semantics, nothing of ours."""
    weight = factors.to(torch.float64).to_dense()
    conv = nn.Conv2d(
        factors.in_channels, factors.out_channels, factors.kernel_size, stride=stride, padding=padding,
        dilation=dilation, groups=factors.groups, bias=bias is not None, padding_mode=padding_mode,
        device=x.device, dtype=torch.float64,
    )
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = bias.to(torch.float64)
    return torch.func.functional_call(conv, params, (x.to(torch.float64),))


def assert_matches_oracle(actual: Tensor, expected: Tensor, dtype, tolerance_key=None) -> None:
    """``dtype``: the expected output dtype; ``tolerance_key``: the TOLERANCE entry, ``dtype`` by default."""
    assert actual.dtype == dtype, f"output dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "output holds NaN/inf (unwritten or overflowed elements)"
    scale = max(expected.abs().max().item(), 1e-6) if expected.numel() else 1.0
    tol = TOLERANCE[dtype if tolerance_key is None else tolerance_key]
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=tol * scale, rtol=0)


def random_factors(
    cout: int, cin: int, kernel_size: tuple[int, int], rank: int, groups: int = 1,
    dtype=torch.float32, device="cpu", generator: Optional[torch.Generator] = None,
) -> CPFactors:
    """Fresh random factors, scaled so the output is O(1) for unit-variance inputs."""
    kh, kw = kernel_size
    shapes = [(groups, cout // groups, rank), (groups, cin // groups, rank), (groups, kh, rank), (groups, kw, rank)]
    fan_in = (cin // groups) * kh * kw
    std = (1.0 / (fan_in * rank)) ** 0.125
    return CPFactors(*(
        (torch.randn(s, generator=generator, dtype=torch.float64) * std).to(device=device, dtype=dtype)
        for s in shapes
    ))


def random_tucker2(
    cout: int, cin: int, kernel_size: tuple[int, int], rank: tuple[int, int], groups: int = 1,
    dtype=torch.float32, device="cpu",
) -> Tucker2Factors:
    """Fresh random Tucker-2 factors (orthonormal channel factors), the output O(1) for unit-variance inputs."""
    kh, kw = kernel_size
    r_out, r_in = rank

    def orthonormal(rows, cols):  # orthonormal columns where rows >= cols
        m = torch.randn(groups, rows, cols, dtype=torch.float64)
        return torch.linalg.qr(m)[0] if rows >= cols else m / rows ** 0.5

    core = torch.randn(groups, r_out, r_in, kh, kw, dtype=torch.float64) / ((cin // groups) * kh * kw) ** 0.5
    factors = Tucker2Factors(orthonormal(cout // groups, r_out) * (cout // groups / r_out) ** 0.5, core,
                             orthonormal(cin // groups, r_in) * (cin // groups / r_in) ** 0.5)
    return factors.to(device=device, dtype=dtype)
