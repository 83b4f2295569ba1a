"""What every family's decomposition shares: the guard on a conv weight, and the input whitening that makes a
decomposition minimise the conv's output error on calibration statistics instead of its weight error."""
from __future__ import annotations

import torch
from torch import Tensor


def check_weight(weight: Tensor, groups: int) -> None:
    """A 4-D floating-point ``[Cout, Cin/groups, kh, kw]`` weight of finite values, with valid groups."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(
            "expected a 4-D conv weight [Cout, Cin/groups, kh, kw], got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating point weight, got {weight.dtype}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"out_channels ({weight.shape[0]}) must be divisible by groups ({groups})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("cannot decompose a weight holding NaN or infinite values")


def input_whitening(input_covariance: Tensor, in_channels: int, groups: int) -> tuple[Tensor, Tensor]:
    """Symmetric square root ``S^(1/2)`` of each group's block of an input-channel covariance, and its
    inverse: ``(G, Cin/G, Cin/G)`` each, float64.

    A conv's output error for a weight error ``E`` over inputs with channel second moments ``S``
    (spatial correlation aside) is ``sum_{o,i,j} E[o,:,i,j]^T S E[o,:,i,j] = ||E x_c S^(1/2)||^2``, so
    CP of the weight multiplied along its input mode by ``S^(1/2)`` minimises the output error, and
    ``S^(-1/2)`` takes the input factor back. Eigenvalues below 1e-10 of the largest are raised to
    it so that the inverse exists (a channel that never varies carries no error either way).
    """
    if not isinstance(input_covariance, Tensor) or input_covariance.shape != (in_channels, in_channels):
        got = tuple(input_covariance.shape) if isinstance(input_covariance, Tensor) else type(input_covariance).__name__
        raise ValueError(f"input_covariance must be a ({in_channels}, {in_channels}) tensor, got {got}")
    s = input_covariance.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("input_covariance holds NaN or infinite values")
    if not torch.allclose(s, s.T, rtol=1e-6, atol=1e-12 * float(s.abs().max())):
        raise ValueError("input_covariance must be symmetric")
    c = in_channels // groups
    blocks = torch.stack([s[g * c:(g + 1) * c, g * c:(g + 1) * c] for g in range(groups)])
    lam, q = torch.linalg.eigh((blocks + blocks.transpose(1, 2)) / 2)
    if bool((lam < -1e-8 * lam.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)).any()) or not bool((lam > 0).any()):
        raise ValueError("input_covariance must be positive semi-definite and non-zero")
    lam = lam.clamp_min(1e-10 * float(lam.max()))
    root = q @ torch.diag_embed(lam.sqrt()) @ q.transpose(1, 2)
    inverse = q @ torch.diag_embed(lam.rsqrt()) @ q.transpose(1, 2)
    return root, inverse


def whiten_input_mode(weight: Tensor, root: Tensor) -> Tensor:
    """``W[o, c', i, j] = sum_c W[o, c, i, j] root[g, c, c']``, group by group (float64)."""
    groups = root.shape[0]
    w = weight.detach().to(torch.float64).unflatten(0, (groups, -1))  # [G, Cout/G, Cin/G, kh, kw]
    return torch.einsum("goc...,gcd->god...", w, root.to(w.device)).flatten(0, 1)


def is_scaled_identity(s: Tensor) -> bool:
    """A covariance proportional to the identity weighs every channel alike: plain CP, bit for bit."""
    return bool((s == torch.diag_embed(torch.diagonal(s))).all()) and bool((torch.diagonal(s) == s[0, 0]).all())
