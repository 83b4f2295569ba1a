"""The factors of a (possibly grouped) conv weight: CP (below), Tucker-2 (:class:`Tucker2Factors`) and the
truncated SVD of a 1x1 conv (:class:`SVDFactors`).

A conv weight ``W[Cout, Cin/G, kh, kw]`` with ``G`` groups is approximated group by group::

    W[g*Cog + o, c, i, j] ~= sum_r output[g, o, r] * input[g, c, r] * vertical[g, i, r] * horizontal[g, j, r]

Every factor carries a leading group dimension, ``G = 1`` included, so every consumer (the reference
op, the fused kernel, the module) reads one layout and never special-cases groups.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


class FactoredWeight:
    """What CP and Tucker-2 factors of a conv weight share: the weight they stand for, their dtype and
    device, their size, and copies. A subclass is a frozen dataclass of its factor tensors, each with the
    group dimension first and ``output`` ``(G, Cout/G, .)`` and ``input`` ``(G, Cin/G, .)`` among them; it
    defines ``as_tuple``, ``rank``, ``kernel_size`` and ``to_dense``."""

    @property
    def groups(self) -> int:
        return self.output.shape[0]

    @property
    def out_channels(self) -> int:
        return self.groups * self.output.shape[1]

    @property
    def in_channels(self) -> int:
        return self.groups * self.input.shape[1]

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """Shape of the dense weight these factors stand for: ``(Cout, Cin/G, kh, kw)``."""
        return (self.out_channels, self.input.shape[1], *self.kernel_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.output.dtype

    @property
    def device(self) -> torch.device:
        return self.output.device

    @property
    def num_params(self) -> int:
        """Number of values held by the factors."""
        return sum(f.numel() for f in self.as_tuple())

    @property
    def dense_num_params(self) -> int:
        """Number of values in the dense weight (bias excluded)."""
        cout, cin_g, kh, kw = self.weight_shape
        return cout * cin_g * kh * kw

    def relative_error(self, weight: Tensor) -> float:
        """``||W - W_hat|| / ||W||`` in float64 (0 when both are zero)."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not match the factors' {self.weight_shape}"
            )
        return weight_error(self.to(torch.float64).to_dense(), weight)

    def to(self, *args, **kwargs):
        """Like ``Tensor.to``, applied to each factor."""
        return type(self)(*(f.to(*args, **kwargs) for f in self.as_tuple()))

    def detach(self):
        return type(self)(*(f.detach() for f in self.as_tuple()))

    def unwhitened(self, inverse: Tensor):
        """These factors of a decomposition of the input-whitened weight (:mod:`cpkernels.decompositions.whitening`)
        with their input factor taken back: ``input = S^(-1/2) input'``, ``inverse`` being ``(G, Cin/G, Cin/G)``."""
        b = torch.matmul(inverse.to(device=self.device, dtype=torch.float64), self.input.to(torch.float64))
        return dataclasses.replace(self, input=b.to(self.dtype))

    def __repr__(self) -> str:
        cout, cin_g, kh, kw = self.weight_shape
        return (
            f"{type(self).__name__}(rank={self.rank}, groups={self.groups}, weight_shape=({cout}, {cin_g}, {kh}, "
            f"{kw}), num_params={self.num_params}, dtype={self.dtype}, device={self.device})"
        )


@dataclass(frozen=True, repr=False)
class CPFactors(FactoredWeight):
    """Four CP factors of a conv weight, each of shape ``(G, dim, R)``.

    Attributes:
        output: ``(G, Cout/G, R)``, the last 1x1 conv (R -> Cout).
        input: ``(G, Cin/G, R)``, the first 1x1 conv (Cin -> R).
        vertical: ``(G, kh, R)``, the kh x 1 depthwise conv.
        horizontal: ``(G, kw, R)``, the 1 x kw depthwise conv.
    """

    output: Tensor
    input: Tensor
    vertical: Tensor
    horizontal: Tensor

    def __post_init__(self) -> None:
        # Plain comparisons: a module builds one of these on every forward.
        o, i, v, h = self.output, self.input, self.vertical, self.horizontal
        if not (o.dim() == i.dim() == v.dim() == h.dim() == 3):
            raise ValueError(
                "CPFactors expects four 3-D factors (G, dim, R), got shapes "
                f"{[tuple(f.shape) for f in self.as_tuple()]}"
            )
        so, si, sv, sh = o.shape, i.shape, v.shape, h.shape
        if not (so[0] == si[0] == sv[0] == sh[0] and so[2] == si[2] == sv[2] == sh[2]):
            raise ValueError(
                "all CP factors must share the group and rank dimensions, got shapes "
                f"{[tuple(f.shape) for f in self.as_tuple()]}"
            )
        if not (o.dtype == i.dtype == v.dtype == h.dtype and o.device == i.device == v.device == h.device):
            raise ValueError("all CP factors must share one dtype and one device")

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.output, self.input, self.vertical, self.horizontal)

    @property
    def rank(self) -> int:
        return self.output.shape[2]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.vertical.shape[1], self.horizontal.shape[1])

    def to_dense(self) -> Tensor:
        """The reconstructed weight ``[Cout, Cin/G, kh, kw]``."""
        return reconstruct(self.output, self.input, self.vertical, self.horizontal)

    def cancellation(self) -> float:
        """``sum_r ||term_r|| / ||W_hat||`` in float64: 1 for terms that never overlap, large where the
        rank-one terms cancel (trained layers at R ~ C: 40-80), which is where rounding any rank-R
        intermediate costs precision. ``inf`` for a non-zero sum of terms that reconstructs zero."""
        f = self.to(torch.float64)
        norms = [torch.linalg.vector_norm(t, dim=1) for t in f.as_tuple()]  # each [G, R]
        total = (norms[0] * norms[1] * norms[2] * norms[3]).sum()
        weight = torch.linalg.vector_norm(f.to_dense())
        if weight == 0:
            return 1.0 if total == 0 else float("inf")
        return float(total / weight)

    def to_cptensor(self, group: int = 0):
        """Group ``group``'s CP as a TensorLy ``CPTensor`` (unit weights; factors in ``[Cout/G, Cin/G, kh, kw]``
        mode order), for use with TensorLy's own tools."""
        # tensorly is imported on first use: importing cpkernels must not import it
        from tensorly.cp_tensor import CPTensor

        factors = [f[group] for f in self.as_tuple()]
        return CPTensor((torch.ones(self.rank, dtype=self.dtype, device=self.device), factors))



def reconstruct(output: Tensor, input: Tensor, vertical: Tensor, horizontal: Tensor) -> Tensor:
    """``W[g*Cout/G + o, c, i, j] = sum_r A[g,o,r] B[g,c,r] V[g,i,r] H[g,j,r]`` as one batched GEMM
    against the Khatri-Rao product of the small factors (differentiable). A 4-operand einsum built a
    ``Cout x Cin x kh x kw x R`` intermediate instead: 10 ms a call for a 128x128x3x3 weight at R = 160.
    16-bit factors are combined in fp32 and the weight rounded once: trained layers' terms cancel, and
    rounding every product would cost the weight its precision."""
    g, cout_g, r = output.shape
    cin_g, kh, kw = input.shape[1], vertical.shape[1], horizontal.shape[1]
    dtype = torch.promote_types(output.dtype, torch.float32)
    b, v, h = (f.to(dtype) for f in (input, vertical, horizontal))
    kr = b[:, :, None, None, :] * v[:, None, :, None, :] * h[:, None, None, :, :]
    # [G, Co, R] @ [G, R, Ci*kh*kw] -> [G, Co, Ci*kh*kw]
    w = torch.bmm(output.to(dtype), kr.reshape(g, cin_g * kh * kw, r).transpose(1, 2))
    return w.reshape(g * cout_g, cin_g, kh, kw).to(output.dtype)


def weight_error(approx: Tensor, weight: Tensor) -> float:
    """``||W - W_hat|| / ||W||`` in float64 (0 when both are zero; inf for a zero W and a non-zero W_hat)."""
    w = weight.detach().to(device=approx.device, dtype=torch.float64)
    norm = torch.linalg.vector_norm(w)
    diff = torch.linalg.vector_norm(w - approx.detach().to(torch.float64))
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / norm)


def params_per_rank(out_channels: int, in_channels: int, kernel_size: tuple[int, int], groups: int) -> int:
    """Factor values added by one more rank: one column in each factor of each group."""
    return out_channels + in_channels + groups * (kernel_size[0] + kernel_size[1])


@dataclass(frozen=True, repr=False)
class Tucker2Factors(FactoredWeight):
    """A Tucker-2 conv weight: a core over the kernel taps between two channel factors, per group::

        W[g*Cog + o, c, i, j] ~= sum_{a,b} output[g, o, a] * core[g, a, b, i, j] * input[g, c, b]

    Attributes:
        output: ``(G, Cout/G, R_out)``, the last 1x1 conv (R_out -> Cout).
        core: ``(G, R_out, R_in, kh, kw)``, the kh x kw conv between the two (R_in -> R_out).
        input: ``(G, Cin/G, R_in)``, the first 1x1 conv (Cin -> R_in).
    """

    output: Tensor
    core: Tensor
    input: Tensor

    def __post_init__(self) -> None:
        o, k, i = self.output, self.core, self.input
        if not (o.dim() == 3 and k.dim() == 5 and i.dim() == 3):
            raise ValueError("Tucker2Factors expects output (G, Cout/G, R_out), core (G, R_out, R_in, kh, kw) and "
                             f"input (G, Cin/G, R_in), got shapes {[tuple(f.shape) for f in self.as_tuple()]}")
        if not (o.shape[0] == k.shape[0] == i.shape[0] and o.shape[2] == k.shape[1] and i.shape[2] == k.shape[2]):
            raise ValueError("the Tucker-2 factors must share the group dimension and the core's ranks, got shapes "
                             f"{[tuple(f.shape) for f in self.as_tuple()]}")
        if not (o.dtype == k.dtype == i.dtype and o.device == k.device == i.device):
            raise ValueError("all Tucker-2 factors must share one dtype and one device")

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.output, self.core, self.input)

    @property
    def rank(self) -> tuple[int, int]:
        """``(R_out, R_in)``, per group."""
        return (self.core.shape[1], self.core.shape[2])

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.core.shape[3], self.core.shape[4])

    def to_dense(self) -> Tensor:
        """The reconstructed weight ``[Cout, Cin/G, kh, kw]`` (differentiable; 16-bit factors combined in fp32)."""
        g, cout_g, r_out = self.output.shape
        dtype = torch.promote_types(self.dtype, torch.float32)
        core, b = self.core.to(dtype), self.input.to(dtype)
        kh, kw = self.kernel_size
        folded = torch.einsum("gabij,gcb->gacij", core, b)  # [G, R_out, Cin/G, kh, kw]
        # [G, Co, R_out] @ [G, R_out, Ci*kh*kw] -> [G, Co, Ci*kh*kw]
        w = torch.bmm(self.output.to(dtype), folded.reshape(g, r_out, -1))
        return w.reshape(g * cout_g, self.input.shape[1], kh, kw).to(self.dtype)

    def tap_weights(self) -> Tensor:
        """``[G, kh*kw, Cin/G, R_out]``: the input factor folded into the core, one ``Cin/G x R_out`` matrix per
        tap, ``T[g, i*kw + j, c, a] = sum_b input[g, c, b] core[g, a, b, i, j]`` (fp32 for 16-bit factors, then
        rounded once): what the fused kernel contracts each shifted input with."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        g, r_out, r_in, kh, kw = self.core.shape
        t = torch.einsum("gcb,gabij->gijca", self.input.to(dtype), self.core.to(dtype))
        return t.reshape(g, kh * kw, self.input.shape[1], r_out).to(self.dtype)



@dataclass(frozen=True, repr=False)
class SVDFactors(FactoredWeight):
    """A low-rank 1x1 conv weight, per group: ``W[g*Cog + o, c, 0, 0] ~= sum_r output[g, o, r] * input[g, c, r]``
    (a truncated SVD, its singular values split evenly between the two factors).

    Attributes:
        output: ``(G, Cout/G, R)``, the second 1x1 conv (R -> Cout).
        input: ``(G, Cin/G, R)``, the first 1x1 conv (Cin -> R).
    """

    output: Tensor
    input: Tensor

    def __post_init__(self) -> None:
        o, i = self.output, self.input
        if not (o.dim() == i.dim() == 3 and o.shape[0] == i.shape[0] and o.shape[2] == i.shape[2]):
            raise ValueError("SVDFactors expects output (G, Cout/G, R) and input (G, Cin/G, R), got shapes "
                             f"{[tuple(f.shape) for f in self.as_tuple()]}")
        if not (o.dtype == i.dtype and o.device == i.device):
            raise ValueError("both SVD factors must share one dtype and one device")

    def as_tuple(self) -> tuple[Tensor, Tensor]:
        return (self.output, self.input)

    @property
    def rank(self) -> int:
        return self.output.shape[2]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (1, 1)

    def to_dense(self) -> Tensor:
        """The reconstructed weight ``[Cout, Cin/G, 1, 1]`` (differentiable; 16-bit factors combined in fp32)."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        w = torch.bmm(self.output.to(dtype), self.input.to(dtype).transpose(1, 2))  # [G, Co, Ci]
        return w.reshape(self.out_channels, self.input.shape[1], 1, 1).to(self.dtype)


def svd_params(out_channels: int, in_channels: int, rank: int) -> int:
    """Values held by SVD factors of per-group rank ``rank``: one column of each factor per rank and group."""
    return rank * (out_channels + in_channels)


def tucker2_params(out_channels: int, in_channels: int, kernel_size: tuple[int, int], groups: int,
                   rank: tuple[int, int]) -> int:
    """Values held by Tucker-2 factors of per-group ranks ``(R_out, R_in)``."""
    r_out, r_in = rank
    return out_channels * r_out + in_channels * r_in + groups * r_out * r_in * kernel_size[0] * kernel_size[1]
