"""The tile tables of a kernel, and the autotune configs made from them (every kernel of this package has a
:class:`TileSet`: one tile list for 16-bit inputs, one for fp32, one large-block tile for the interpreter)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from cpkernels.core.switches import autotune_enabled, triton_interpreter_enabled


class TileSet:
    """The tile tables of one kernel and the autotune configs made from them.

    A tile is the kernel's meta-parameters in ``names`` order, then ``num_warps`` and ``num_stages``.
    """

    def __init__(self, names, tiles_16bit, tiles_fp32, tiles_interpreter, tiles_16bit_sm90=()):
        self.names = names
        self.tiles_16bit, self.tiles_fp32, self.tiles_interpreter = tiles_16bit, tiles_fp32, tiles_interpreter
        # 16-bit tiles that compile without spills only where the output GEMM's B operand is read from shared
        # memory (Hopper's wgmma); sm_80's mma.sync holds it in registers and spills them.
        self.tiles_16bit_sm90 = tiles_16bit_sm90

    def tiles(self, dtype: torch.dtype, arch: int) -> tuple[tuple[int, ...], ...]:
        """The tiles for an input dtype on a GPU of compute capability ``arch`` (e.g. 80, 90)."""
        if dtype == torch.float32:
            return self.tiles_fp32
        return self.tiles_16bit + (self.tiles_16bit_sm90 if arch >= 90 else ())

    def for_dtype(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> tuple[tuple[int, ...], ...]:
        """The tiles autotuned for an input dtype on ``device`` (one large-block tile under the interpreter)."""
        if triton_interpreter_enabled():
            return self.tiles_interpreter
        major, minor = torch.cuda.get_device_capability(device) if device is not None else (8, 0)
        return self.tiles(dtype, 10 * major + minor)

    def configs(self) -> list[triton.Config]:
        """Every config the autotuner may try; :meth:`prune` keeps the input dtype's and device's."""
        if triton_interpreter_enabled():
            tiles = self.tiles_interpreter
        else:
            tiles = dict.fromkeys(self.tiles_16bit + self.tiles_16bit_sm90 + self.tiles_fp32)
        return [
            triton.Config(dict(zip(self.names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles
        ]

    def tile_of(self, config: triton.Config) -> tuple[int, ...]:
        return (*(config.kwargs[n] for n in self.names), config.num_warps, config.num_stages)

    def prune(self, configs, named_args, whole_rank: bool = False):
        """The dtype's tiles (those whose BLOCK_R covers the rank, if ``whole_rank``), minus tiles far wider
        than the problem: they only add masked work."""
        x = named_args["x_ptr"]
        wanted = set(self.for_dtype(x.dtype, x.device if x.is_cuda else None))
        rank = named_args["RANK"]
        configs = [
            c for c in configs if self.tile_of(c) in wanted and (not whole_rank or c.kwargs["BLOCK_R"] >= rank)
        ]

        def fits(c):
            k = c.kwargs
            return (
                k["BLOCK_R"] <= max(16, triton.next_power_of_2(rank))
                and k["BLOCK_O"] <= max(16, triton.next_power_of_2(named_args["C_OUT_G"]))
                and k["BLOCK_C"] <= max(16, triton.next_power_of_2(named_args["C_IN_G"]))
            )

        fitting = [c for c in configs if fits(c)]
        if not fitting and configs:
            fitting = [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_C"])]
        return fitting if autotune_enabled() else fitting[:1]
