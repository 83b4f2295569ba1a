"""The one cost model of a conv layer: MACs dense and in each factored form, the minimal bytes a fused kernel
must move, and the bytes its programs re-read from the GPU's caches. The per-call plans
(:mod:`cpkernels.dispatch`), the rank planner and the compression report all count from here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from cpkernels.core import conv_args


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ConvShape:
    """One conv call's dimensions. ``stride`` and ``dilation``: an int or an (H, W) pair; ``padding``: an int,
    an (H, W) pair (symmetric), or ``(top, bottom, left, right)``."""

    batch: int
    cin: int
    cout: int
    size: tuple[int, int]  # input H, W
    kernel: tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | tuple[int, int, int, int] = 1
    groups: int = 1
    dilation: int | tuple[int, int] = 1
    output: Optional[tuple[int, int]] = field(default=None, repr=False)  # the output H, W if the caller has it

    @property
    def stride2(self) -> tuple[int, int]:
        return _pair(self.stride)

    @property
    def dilation2(self) -> tuple[int, int]:
        return _pair(self.dilation)

    @classmethod
    def of_conv(cls, conv, in_hw: tuple[int, int], batch: int = 1) -> "ConvShape":
        """The shape of a call of ``conv`` (an ``nn.Conv2d`` or a factored conv: anything with its attributes,
        string paddings included) on ``batch`` images of ``in_hw``."""
        padding = conv_args.explicit_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.dilation))
        return cls(batch, conv.in_channels, conv.out_channels, tuple(in_hw), tuple(conv.kernel_size),
                   tuple(conv.stride), padding, conv.groups, tuple(conv.dilation))

    @property
    def padding4(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)``."""
        if isinstance(self.padding, int):
            return (self.padding,) * 4
        if len(self.padding) == 2:
            return (self.padding[0], self.padding[0], self.padding[1], self.padding[1])
        return tuple(self.padding)

    @property
    def out_size(self) -> tuple[int, int]:
        if self.output is not None:
            return tuple(self.output)
        return conv_args.output_size(self.size, self.kernel, self.stride2, self.padding4, self.dilation2)

    @property
    def out_pixels(self) -> int:
        oh, ow = self.out_size
        return self.batch * oh * ow

    def dense_macs(self) -> int:
        kh, kw = self.kernel
        return self.out_pixels * self.cout * (self.cin // self.groups) * kh * kw

    def cp_macs(self, rank: int, merged_depthwise: bool = False) -> int:
        """MACs of the four-stage CP layer (per group rank R): Cin->R, kh x 1, 1 x kw, R->Cout;
        ``merged_depthwise``: the two depthwise stages as one kh x kw depthwise conv (the CPU path)."""
        kh, kw = self.kernel
        g = self.groups
        oh, ow = self.out_size
        h, w = self.size
        stage1 = self.batch * h * w * (self.cin // g) * rank * g
        if merged_depthwise:
            depthwise = self.out_pixels * kh * kw * rank * g
        else:  # the vertical stage at the vertical stride, before the horizontal one
            depthwise = self.batch * oh * w * kh * rank * g + self.out_pixels * kw * rank * g
        stage4 = self.out_pixels * rank * (self.cout // g) * g
        return stage1 + depthwise + stage4

    def tucker2_macs(self, rank: tuple[int, int]) -> int:
        """MACs of the three-stage Tucker-2 layer (per-group ranks ``(R_out, R_in)``)."""
        kh, kw = self.kernel
        r_out, r_in = rank
        h, w = self.size
        return (self.batch * h * w * self.cin * r_in + self.out_pixels * self.groups * r_out * r_in * kh * kw
                + self.out_pixels * r_out * self.cout)

    def svd_macs(self, rank: int) -> int:
        """MACs of the two-stage low-rank 1x1 layer (per-group rank R): Cin->R at the output's pixels (the first
        1x1 conv carries the stride), then R->Cout."""
        return self.out_pixels * rank * (self.cin + self.cout)

    def tucker2_fused_macs(self, rank: tuple[int, int]) -> int:
        """MACs of the taps kernel on folded tap weights: kh*kw*Cin/G into R_out per pixel, then R_out -> Cout."""
        kh, kw = self.kernel
        return self.out_pixels * self.groups * rank[0] * (kh * kw * self.cin // self.groups + self.cout // self.groups)

    def fused_kernel_macs(self, rank: int, rows: int = 8) -> int:
        """MACs the fused kernel that ``kernel="auto"`` launches issues (docs/kernel.md): the rows kernel
        (kh = 3, stride 1 or 2, R <= 128) folds only the horizontal taps and computes
        stride*ROWS + 3 - stride input rows per band of ROWS output rows; the taps kernel (R <= 128)
        folds every tap; the wide kernel (larger ranks) does stage 1 once per input row of a band (its
        column halo and tile padding left out here; :mod:`cpkernels.dispatch.gpu` counts them)."""
        kh, kw = self.kernel
        cin_g, cout_g = self.cin // self.groups, self.cout // self.groups
        sh = self.stride2[0]
        if kh == 3 and sh in (1, 2) and self.dilation2[0] == 1 and rank <= 128:
            first = kw * cin_g * (sh * rows + 3 - sh) / rows
        elif rank <= 128:
            first = kh * kw * cin_g
        else:
            first = cin_g * ((rows - 1) * sh + (kh - 1) * self.dilation2[0] + 1) / rows
        return int(self.out_pixels * rank * self.groups * (first + cout_g))

    def staged_bytes(self, element_size: int, rank_in: int, rank_out: int) -> int:
        """Bytes the staged forms move as separate passes: X read, Y written, and each intermediate written and
        read once, ``G * rank_in`` channels at the input's size and ``G * rank_out`` at the output's."""
        h, w = self.size
        x_px = self.batch * h * w
        return element_size * (x_px * self.cin + 2 * x_px * self.groups * rank_in
                               + 2 * self.out_pixels * self.groups * rank_out + self.out_pixels * self.cout)

    def minimal_bytes(self, element_size: int) -> int:
        """Read X once and write Y once: the floor for any implementation (weights are negligible)."""
        h, w = self.size
        return element_size * (self.batch * self.cin * h * w + self.out_pixels * self.cout)

    def rows_kernel_factor_bytes(self, rank: int, rows: int, block_w: int, element_size: int) -> int:
        """Factor bytes the rows kernel's programs read (from L2: every program reads the same factors).

        Each program (``rows`` output rows x ``block_w`` columns of one image and group) reloads the
        ``kw*Cin/G x R`` input factor for every input row it computes (``rows + 2`` at stride 1,
        ``2*rows + 1`` at stride 2) and the ``Cout/G x R`` output factor for every output row: per
        factor element loaded, the first GEMM does ``block_w`` MACs.
        """
        oh, ow = self.out_size
        kw = self.kernel[1]
        cin_g, cout_g = self.cin // self.groups, self.cout // self.groups
        programs = self.batch * self.groups * math.ceil(oh / rows) * math.ceil(ow / block_w)
        input_rows = rows + 2 if self.stride2[0] == 1 else 2 * rows + 1
        per_program = input_rows * kw * cin_g * rank + rows * cout_g * rank
        return programs * per_program * element_size
