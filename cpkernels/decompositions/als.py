"""CP-ALS for 4-way conv weights, with the MTTKRPs done as GEMMs.

TensorLy's ``parafac`` spends its time materialising a Khatri-Rao product for every mode, the
largest ``(Cout*Cin*kw) x R`` for the kh mode. This module runs the same ALS (TensorLy's
initialisation, update rule, ridge term and stopping test) but contracts the weight ``W[o, c, i, j]``
so that only two GEMMs per iteration touch it:

    M_out = W[o, (c,i,j)] @ (B ⊙ V ⊙ H)[(c,i,j), r]            the Khatri-Rao of the *input* modes only
    U[r, (c,i,j)] = A_new^T @ W[o, (c,i,j)]                     after the output factor is updated

and the input, vertical and horizontal MTTKRPs are cheap contractions of ``U`` (``R*Cin*kh*kw`` each).
Per iteration that is ``2*Cout*Cin*kh*kw*R`` multiply-adds in BLAS, with no ``Cout*Cin``-sized
Khatri-Rao product ever built.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor


def initial_factors(
    weight: Tensor, rank: int, init: str = "svd", svd: str = "truncated_svd", random_state=None
) -> list[Tensor]:
    """TensorLy's CP initialisation (what ``parafac`` starts from), CP weights folded into mode 0."""
    # tensorly is imported on first use: importing cpkernels must not import it
    import tensorly
    from tensorly.decomposition._cp import initialize_cp

    with tensorly.backend_context("pytorch"), warnings.catch_warnings():
        # The SVD start asks for R singular vectors of each unfolding, more than the kh/kw modes
        # have whenever R > kh; TensorLy warns and pads them, which is expected here.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, factors = initialize_cp(weight, rank, init=init, svd=svd, random_state=random_state)
    factors = [f.to(weight.dtype) for f in factors]
    factors[0] = factors[0] * weights.to(weight.dtype)[None, :]
    return factors


def _solve(gram: Tensor, mttkrp: Tensor) -> Tensor:
    """``mttkrp @ gram^-1`` (gram is symmetric), as TensorLy's update does it."""
    return torch.linalg.solve(gram, mttkrp.T).T


def cp_als(
    weight: Tensor,
    rank: int,
    *,
    init: str = "svd",
    svd: str = "truncated_svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    random_state=None,
    l2_reg: float = 0.0,
    init_factors: Optional[Sequence[Tensor]] = None,
) -> tuple[list[Tensor], list[float]]:
    """Rank-``rank`` CP of a 4-D ``weight`` by alternating least squares.

    Args:
        weight: ``[Cout, Cin, kh, kw]``; its dtype and device are used throughout.
        rank, init, svd, n_iter_max, tol, random_state, l2_reg: as TensorLy's ``parafac`` (the stopping
            test is its ``abs_rec_error``: stop once the relative error drops by less than ``tol``).
        init_factors: start from these four ``(dim, R)`` factors instead (a warm start).

    Returns:
        The four factors ``[(Cout, R), (Cin, R), (kh, R), (kw, R)]`` and the relative error after each
        iteration.
    """
    o, c, kh, kw = weight.shape
    if init_factors is not None:
        a, b, v, h = (f.to(weight).clone() for f in init_factors)
    else:
        a, b, v, h = initial_factors(weight, rank, init, svd, random_state)
    w2 = weight.reshape(o, c * kh * kw)
    norm_sq = float(torch.sum(weight * weight))
    ridge = l2_reg * torch.eye(rank, dtype=weight.dtype, device=weight.device)
    errors: list[float] = []
    for iteration in range(n_iter_max):
        g_b, g_v, g_h = b.T @ b, v.T @ v, h.T @ h
        # Output mode: the Khatri-Rao product of the input modes is (Cin*kh*kw, R), the weight's size / Cout.
        kr_in = (b[:, None, None, :] * v[None, :, None, :] * h[None, None, :, :]).reshape(-1, rank)
        a = _solve(g_b * g_v * g_h + ridge, w2 @ kr_in)
        g_a = a.T @ a
        # Everything else contracts U = A^T W once: [R, Cin, kh, kw].
        u = (a.T @ w2).reshape(rank, c, kh, kw)
        m_b = torch.einsum("rcij,ir,jr->cr", u, v, h)
        b = _solve(g_a * g_v * g_h + ridge, m_b)
        g_b = b.T @ b
        s = torch.einsum("rcij,cr->rij", u, b)  # [R, kh, kw]
        v = _solve(g_a * g_b * g_h + ridge, torch.einsum("rij,jr->ir", s, h))
        g_v = v.T @ v
        m_h = torch.einsum("rij,ir->jr", s, v)
        h = _solve(g_a * g_b * g_v + ridge, m_h)
        g_h = h.T @ h
        # ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2, from the last MTTKRP (TensorLy's way).
        inner = float(torch.sum(h * m_h))
        approx_sq = float(torch.sum(g_a * g_b * g_v * g_h))
        errors.append(abs(norm_sq - 2 * inner + approx_sq) ** 0.5 / norm_sq**0.5)
        if tol and iteration >= 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return [a, b, v, h], errors
