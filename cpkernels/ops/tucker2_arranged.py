"""The CPU path of Tucker-2: its three stages arranged for the CPU's libraries (the profiling behind it is in
:mod:`cpkernels.ops.cp_arranged`), or the dense conv of the reconstructed weight where the CPU plan finds that
faster. It computes what :func:`cpkernels.ops.tucker2_reference.tucker2_conv2d_reference` computes, up to rounding."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core.conv_args import output_size
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops.banded import tucker2_conv2d_banded
from cpkernels.ops.cp_arranged import pointwise_matmul
from cpkernels.ops.reference import upcast_16bit
from cpkernels.ops.tucker2_reference import (_core_padding, tucker2_conv2d_dense_weight, tucker2_conv2d_reference,
                                             tucker2_stage_weights)


def tucker2_conv2d_cpu(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                       bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> Tensor:
    """The three stages arranged for the CPU (see :mod:`cpkernels.ops.cp_arranged` for what profiling showed):
    16-bit inputs in fp32 with one rounding of the output; the dense conv where the CPU plan finds it
    faster (:func:`cpkernels.dispatch.cpu.choose`); NCHW pointwise stages as batched GEMMs; channels_last as
    three convs (GEMMs already)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = upcast_16bit(x, input_factor, core, output_factor, bias)
        return tucker2_conv2d_cpu(*up, stride, padding, dilation).to(x.dtype)
    how = tucker2_cpu_plan(x, input_factor, core, output_factor, bias, stride, padding, dilation)
    return tucker2_conv2d_arranged(how, x, input_factor, core, output_factor, bias, stride, padding, dilation)


def tucker2_cpu_plan(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                     stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> Optional[cpu_dispatch.Plan]:
    """The CPU plan's choice for this call, dense or staged (:data:`STAGES`, or banded; timed on a signature's first
    call in the measured mode), or None for 16-bit ``x``, whose plan :func:`tucker2_conv2d_cpu` works out on the fp32
    copies."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return None
    groups, _, r_in = input_factor.shape
    r_out, kernel_size = core.shape[1], tuple(core.shape[3:])
    cout = output_factor.shape[0] * output_factor.shape[1]
    factors = (input_factor, core, output_factor, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *factors))
    key = cpu_dispatch.call_key(x, (r_out, r_in), groups, cout, kernel_size, stride, padding, dilation, needs_grad)
    how = cpu_dispatch.decided(key)
    if how is None:
        out_size = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        staged = (cpu_dispatch.banded_plan(x, r_in, groups, out_size, needs_grad)
                  or cpu_dispatch.Plan(STAGES, x.shape[0]))
        dense = cpu_dispatch.Plan(cpu_dispatch.DENSE, x.shape[0])

        def run(name: str) -> Tensor:
            if name == "reference":
                return tucker2_conv2d_reference(x, *factors, stride, padding, dilation)
            return tucker2_conv2d_arranged(staged if name == staged.arrangement else dense, x, *factors, stride,
                                           padding, dilation)

        dense_cheaper = cpu_dispatch.tucker2_dense_is_cheaper(x, (r_out, r_in), groups, cout, kernel_size, out_size)
        how = cpu_dispatch.choose(key, dense if dense_cheaper else staged, dense, staged, run, x.dtype, needs_grad)
    return how


# The CPU plan's whole-image staged arrangement of a Tucker-2 call; at inference on large images it takes the banded
# one instead (cpkernels/ops/banded.py).
STAGES = "stages"


def tucker2_conv2d_arranged(how, x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                      bias: Optional[Tensor], stride, padding, dilation) -> Tensor:
    """The Tucker-2 conv of a 4-D fp32/fp64 ``x`` computed the way ``how`` says."""
    if how.arrangement == cpu_dispatch.DENSE:
        return tucker2_conv2d_dense_weight(x, input_factor, core, output_factor, bias, stride, padding, dilation)
    if how.arrangement == cpu_dispatch.BANDED:
        return tucker2_conv2d_banded(x, input_factor, core, output_factor, bias, stride, padding, dilation, how.chunk)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return tucker2_conv2d_reference(x, input_factor, core, output_factor, bias, stride, padding, dilation)
    groups = input_factor.shape[0]
    _, w_core, _ = tucker2_stage_weights(input_factor, core, output_factor)
    explicit, sym = _core_padding(padding)
    t = pointwise_matmul(x, input_factor.transpose(1, 2), None)  # [N, G*R_in, H, W]
    if explicit is not None:
        t = F.pad(t, explicit)
    t = F.conv2d(t, w_core, None, stride, sym, dilation, groups).contiguous()
    return pointwise_matmul(t, output_factor, bias)
