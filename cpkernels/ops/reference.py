"""The reference CP conv: four PyTorch convs, and their backward.

    x --1x1 (Cin->R, groups G)--> t1 --kh x 1 (groups G*R)--> t2 --1 x kw (groups G*R)--> t3
      --1x1 (R->Cout, groups G) + bias--> y

The vertical stage carries the vertical stride/padding/dilation and the horizontal stage the
horizontal ones; zero padding of the rank-R intermediate equals zero padding of ``x`` because stage 1
has no bias. This is the correctness oracle's structure, the CPU path and a benchmark baseline.

Everything here takes already-normalised arguments: 4-D ``x``, factors ``(G, dim, R)``,
``stride``/``dilation`` pairs and ``padding`` as ``(top, bottom, left, right)`` zero padding.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from cpkernels.factors import reconstruct


def stage_weights(
    input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor, output_factor: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four conv weights of the factors ``(G, dim, R)``, channel ``g*R + r`` for rank ``r`` of group ``g``."""
    g, cin_g, r = input_factor.shape
    kh, kw = vertical_factor.shape[1], horizontal_factor.shape[1]
    w_in = input_factor.transpose(1, 2).reshape(g * r, cin_g, 1, 1)
    w_vert = vertical_factor.transpose(1, 2).reshape(g * r, 1, kh, 1)
    w_horz = horizontal_factor.transpose(1, 2).reshape(g * r, 1, 1, kw)
    w_out = output_factor.reshape(-1, r, 1, 1)
    return w_in, w_vert, w_horz, w_out


# Dense weights of factors used without autograd (inference), kept while the first factor lives and none of
# them has changed (version counter, storage, shape, dtype), so that the dense arrangement costs one conv a
# call, as the nn.Conv2d it stands for did. Rebuilding it each call cost more than the conv itself at small
# batches: the reconstruction is Cout*Cin*kh*kw*R MACs, 10x a batch-1 7x7 conv of 512 channels at R = C.
_DENSE_WEIGHTS: dict[int, tuple] = {}


def reused_dense_weight(build: Callable[[], Tensor], *factors: Tensor) -> Tensor:
    """``build()``, or the weight it built for these same factor tensors, unchanged since, when no gradient
    flows to them. Calls that need gradients build it each time (it is part of their graph)."""
    if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
        return build()
    try:
        # A list comprehension and torch.Size as it comes: this runs on every call of a layer run dense.
        prints = tuple([(f._version, f.data_ptr(), f.shape, f.stride(), f.dtype, f.device) for f in factors])
    except RuntimeError:  # inference-mode tensors keep no version counter
        return build()
    key = id(factors[0])
    cached = _DENSE_WEIGHTS.get(key)
    if cached is not None:
        refs, cached_prints, weight = cached
        if cached_prints == prints and all(r() is f for r, f in zip(refs, factors)):
            return weight
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor: later calls may save it for backward
        weight = build()
    if cached is None:
        weakref.finalize(factors[0], _DENSE_WEIGHTS.pop, key, None)  # the entry goes with its first factor
    _DENSE_WEIGHTS[key] = (tuple(weakref.ref(f) for f in factors), prints, weight)
    return weight


def cp_conv2d_dense_weight(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                           output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The same function as one dense conv of the reconstructed weight: where CP saves too little to
    win (the CPU and GPU plans decide). Without autograd the weight is reused while the factors stay as
    they are (:func:`reused_dense_weight`)."""
    factors = (output_factor, input_factor, vertical_factor, horizontal_factor)
    weight = reused_dense_weight(lambda: reconstruct(*factors), *factors)
    pt, pb, pl, pr = padding
    if pt == pb and pl == pr:
        return F.conv2d(x, weight, bias, stride, (pt, pl), dilation, input_factor.shape[0])
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, input_factor.shape[0])


def _split_padding(lo: int, hi: int) -> tuple[tuple[int, int], int]:
    """Symmetric part for the conv, and the explicit (lo, hi) pad still needed before it."""
    if lo == hi:
        return (0, 0), lo
    return (lo, hi), 0


def cp_conv2d_reference(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                        output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Four-stage CP conv of a 4-D ``x``; see the module docstring for the argument conventions."""
    groups, _, rank = input_factor.shape
    w_in, w_vert, w_horz, w_out = stage_weights(input_factor, vertical_factor, horizontal_factor, output_factor)
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = stride, padding, dilation
    pad_v, ph = _split_padding(pt, pb)
    pad_h, pw = _split_padding(pl, pr)

    # record_function names the stages for torch.profiler (cpkernels.tools.profile); it costs nothing
    # measurable when no profiler runs.
    with record_function("cp_conv2d.stage1_pointwise_in"):
        t = F.conv2d(x, w_in, None, 1, 0, 1, groups)
    with record_function("cp_conv2d.stage2_vertical"):
        if pad_v != (0, 0):
            t = F.pad(t, (0, 0, *pad_v))
        t = F.conv2d(t, w_vert, None, (sh, 1), (ph, 0), (dh, 1), groups * rank)
    with record_function("cp_conv2d.stage3_horizontal"):
        if pad_h != (0, 0):
            t = F.pad(t, pad_h)
        t = F.conv2d(t, w_horz, None, (1, sw), (0, pw), (1, dw), groups * rank)
    with record_function("cp_conv2d.stage4_pointwise_out"):
        y = F.conv2d(t, w_out, bias, 1, 0, 1, groups)
    # The output follows the input's memory format, whatever the conv backends chose.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def upcast_16bit(*tensors):
    """fp16/bf16 tensors as fp32 (others and None as they are): for running 16-bit layers with fp32
    intermediates."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def cp_conv2d_reference_fp32(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                             output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The four stages with fp32 intermediates for 16-bit inputs, the output rounded once: the GPU
    plan's ``four-stage`` strategy. Trained layers' terms cancel (16x on the digits CNN of the tests,
    40-80x on VGG-16), and 16-bit intermediates put the four stages at 4x the dense conv's error there.
    TF32 (10 mantissa bits) is kept for bf16 inputs, 8x finer than bf16 itself; fp16 inputs, whose own
    mantissa is 10 bits, get IEEE fp32."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return cp_conv2d_reference(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias,
                                   stride, padding, dilation)
    up = upcast_16bit(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias)
    allow_tf32 = x.dtype == torch.bfloat16 and torch.backends.cudnn.allow_tf32
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                    deterministic=torch.backends.cudnn.deterministic, allow_tf32=allow_tf32):
        return cp_conv2d_reference(*up, stride, padding, dilation).to(x.dtype)


def stage_backward(grad: Tensor, inp: Tensor, weight: Tensor, groups: int, needs: Sequence[bool], stride=(1, 1),
                   padding=(0, 0), dilation=(1, 1), bias_size: Optional[int] = None):
    """``(grad input, grad weight, grad bias)`` of one stage ``F.conv2d(inp, weight, bias, stride, padding,
    dilation, groups)``, by ``aten.convolution_backward``, which traces under ``torch.compile`` and
    ``torch.export`` as the custom ops' backward (``torch.autograd.grad`` would not); ``needs`` says which."""
    return torch.ops.aten.convolution_backward.default(
        grad, inp, weight, None if bias_size is None else [bias_size], list(stride), list(padding), list(dilation),
        False, [0, 0], groups, list(needs))


def cp_conv2d_reference_backward(grad_y: Tensor, x: Tensor, input_factor: Tensor, vertical_factor: Tensor,
                                 horizontal_factor: Tensor, output_factor: Tensor, has_bias: bool,
                                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                 needs_grad: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`cp_conv2d_reference` for ``(x, input, vertical, horizontal, output, bias)``.

    Written with ``aten.convolution_backward`` rather than ``torch.autograd.grad`` so that it traces
    under ``torch.compile``/``torch.export`` as the backward of the custom op. The intermediates are
    recomputed (one extra forward) instead of being kept alive between forward and backward.
    """
    groups, _, rank = input_factor.shape
    gr = groups * rank
    w_in, w_vert, w_horz, w_out = stage_weights(input_factor, vertical_factor, horizontal_factor, output_factor)
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = stride, padding, dilation
    pad_v, ph = _split_padding(pt, pb)
    pad_h, pw = _split_padding(pl, pr)
    need_x, need_in, need_v, need_h, need_out, need_b = needs_grad

    # Forward again, keeping what each stage's backward needs.
    t1 = F.conv2d(x, w_in, None, 1, 0, 1, groups)
    t1p = F.pad(t1, (0, 0, *pad_v)) if pad_v != (0, 0) else t1
    t2 = F.conv2d(t1p, w_vert, None, (sh, 1), (ph, 0), (dh, 1), gr)
    t2p = F.pad(t2, pad_h) if pad_h != (0, 0) else t2
    t3 = F.conv2d(t2p, w_horz, None, (1, sw), (0, pw), (1, dw), gr)

    g_t3, g_w_out, g_bias = stage_backward(grad_y, t3, w_out, groups, [True, need_out, has_bias and need_b],
                                           bias_size=w_out.shape[0] if has_bias else None)
    need_t2 = need_x or need_in or need_v
    g_t2p, g_w_horz, _ = stage_backward(g_t3, t2p, w_horz, gr, [need_t2, need_h, False], (1, sw), (0, pw), (1, dw))
    g_t1p = g_w_vert = None
    if need_t2:
        g_t2 = g_t2p[..., pad_h[0]:pad_h[0] + t2.shape[3]] if pad_h != (0, 0) else g_t2p
        g_t1p, g_w_vert, _ = stage_backward(g_t2, t1p, w_vert, gr, [need_x or need_in, need_v, False], (sh, 1),
                                            (ph, 0), (dh, 1))
    g_x = g_w_in = None
    if g_t1p is not None:
        g_t1 = g_t1p[:, :, pad_v[0]:pad_v[0] + t1.shape[2]] if pad_v != (0, 0) else g_t1p
        g_x, g_w_in, _ = stage_backward(g_t1, x, w_in, groups, [need_x, need_in, False])

    cin_g = input_factor.shape[1]
    kh, kw = vertical_factor.shape[1], horizontal_factor.shape[1]
    return (
        g_x if need_x else None,
        g_w_in.reshape(groups, rank, cin_g).transpose(1, 2) if need_in and g_w_in is not None else None,
        g_w_vert.reshape(groups, rank, kh).transpose(1, 2) if need_v and g_w_vert is not None else None,
        g_w_horz.reshape(groups, rank, kw).transpose(1, 2) if need_h and g_w_horz is not None else None,
        g_w_out.reshape(output_factor.shape) if need_out and g_w_out is not None else None,
        g_bias if has_bias and need_b else None,
    )
