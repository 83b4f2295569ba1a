"""The torch.library op: opcheck, torch.compile, torch.export, autocast."""
import contextlib
import os
import shutil

import pytest
import torch
import torch._inductor.config

from cpkernels import CPConv2d, cp_conv2d

from .cases import assert_compiles_and_exports
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors


def op_args(x, factors, bias, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), impl="reference"):
    return (x, factors.input, factors.vertical, factors.horizontal, factors.output, bias,
            list(stride), list(padding), list(dilation), impl)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(), id="pad1"),
        pytest.param(dict(stride=(2, 1), padding=(0, 1, 2, 1), dilation=(1, 2)), id="asymmetric-strided"),
        pytest.param(dict(layout="channels_last"), id="channels-last"),
        pytest.param(dict(bias=False), id="no-bias"),
        pytest.param(dict(impl="triton"), id="triton"),
        pytest.param(dict(impl="cpu"), id="cpu"),
        pytest.param(dict(impl="cpu", layout="channels_last", padding=(0, 1, 2, 1)), id="cpu-channels-last-asym"),
    ],
)
def test_opcheck(kwargs, device):
    kwargs = dict(kwargs)
    layout = kwargs.pop("layout", "nchw")
    has_bias = kwargs.pop("bias", True)
    factors = random_factors(6, 8, (3, 3), 4, groups=2, device=device)
    factors = type(factors)(*(f.requires_grad_() for f in factors.as_tuple()))
    x = torch.randn(2, 8, 7, 9, device=device, requires_grad=True)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(6, device=device, requires_grad=True) if has_bias else None
    torch.library.opcheck(torch.ops.cpkernels.cp_conv2d.default, op_args(x, factors, bias, **kwargs))


def _has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _inductor_vectorisation():
    """Inductor vectorises its C++ by the CPU's own flags, while ATen's vector headers follow
    ``ATEN_CPU_CAPABILITY``: with that forced to ``default`` (the suite's lowered-ISA run) the vectorised code does
    not compile (torch 2.13: "'at::vec' has not been declared"), so there inductor generates scalar code."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        return torch._inductor.config.patch({"cpp.simdlen": 1})
    return contextlib.nullcontext()


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("aot_eager", id="aot_eager"),
        pytest.param("inductor", id="inductor", marks=pytest.mark.skipif(
            not _has_cxx_compiler(), reason="inductor's CPU code generation needs a C++ compiler")),
    ],
)
def test_compile_fullgraph_matches_eager(backend):
    """Forward and every gradient of a compiled CPConv2d (the custom op inside one graph) equal eager; torch.export
    records the op."""
    layer = CPConv2d(8, 6, 3, rank=4, padding=1, groups=2, padding_mode="reflect")
    with _inductor_vectorisation():
        assert_compiles_and_exports(layer, torch.randn(2, 8, 9, 9), torch.ops.cpkernels.cp_conv2d.default, backend,
                                    rtol=1e-4, atol=1e-5)


def test_export_round_trip():
    layer = CPConv2d(8, 6, 3, rank=4, padding="same", stride=1).eval()
    assert_compiles_and_exports(layer, torch.randn(2, 8, 9, 9), torch.ops.cpkernels.cp_conv2d.default)


def test_autocast_cpu_bf16_computes_in_bf16_like_conv2d():
    layer = CPConv2d(8, 6, 3, rank=4, padding=1)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        dense = layer.to_conv2d()(x)
    assert y.dtype == dense.dtype == torch.bfloat16
    assert_matches_oracle(y, oracle_conv2d(x, layer.factors.detach(), layer.bias.detach(), padding=1), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_cuda_bf16_runs_the_fused_kernel_in_bf16():
    layer = CPConv2d(32, 64, 3, rank=16, padding=1, device="cuda")
    x = torch.randn(4, 32, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = oracle_conv2d(x, layer.factors.detach(), layer.bias.detach(), padding=1)
    assert_matches_oracle(y, expected, torch.bfloat16)


def test_autocast_leaves_float64_alone():
    layer = CPConv2d(4, 4, 3, rank=2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_functional_op_accepts_conv2d_style_arguments():
    factors = random_factors(6, 4, (3, 3), 3)
    x = torch.randn(4, 9, 9)
    y = cp_conv2d(x, factors, None, stride=(2, 1), padding="valid", dilation=1)
    assert_matches_oracle(y, oracle_conv2d(x, factors, None, stride=(2, 1), padding="valid"), torch.float32)
