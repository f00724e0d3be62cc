"""SOFT's rank components: orthonormal starts, the orthogonality penalty, importance
scores, and the flat positions of the components a client sends.

Component i of a LoRA layer is the pair (row A[i, :], column B[:, i]); B A is the sum of
the rank-one terms B[:, i] A[i, :]. When A's rows are orthonormal and B's columns
orthogonal, that sum is an SVD and ||B[:, i]|| ||A[i, :]|| is exactly the i-th singular
value; the penalty keeps the factors near that, so the cheap score ranks components
almost as the SVD would (after Kim and Choi, arXiv 2505.00333; details reconstructed
from the abstract).
"""

from __future__ import annotations

import math

import torch


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """``a`` (r x d, r <= d) with its rows replaced by an orthonormal basis of their
    span (QR of the transpose; signs fixed so the diagonal of R is positive), so a
    seeded draw stays seeded."""
    q, r = torch.linalg.qr(a.T.to(torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.to(a.dtype).contiguous()


def orthogonality_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||A A^T - I||_F^2 + ||offdiag(B^T B)||_F^2`` of one layer."""
    gram_a = a @ a.T
    eye = torch.eye(gram_a.shape[0], dtype=gram_a.dtype, device=gram_a.device)
    gram_b = b.T @ b
    off = gram_b - torch.diag(torch.diagonal(gram_b))
    return ((gram_a - eye) ** 2).sum() + (off ** 2).sum()


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s_i = ||B[:, i]|| * ||A[i, :]|| for each rank component i."""
    return torch.linalg.vector_norm(b, dim=0) * torch.linalg.vector_norm(a, dim=1)


def svd_importance(a: torch.Tensor, b: torch.Tensor, keep: float) -> torch.Tensor:
    """The exact (SVD) score: the size of component i inside the best rank-k
    approximation of B A (k = ceil(keep * r)), ||U_k^T B[:, i]|| * ||V_k^T A[i, :]||,
    with U_k, V_k the top k singular vectors. Unlike :func:`importance` it does not
    assume orthogonal factors: two components that share a direction split its singular
    value instead of each claiming it whole. With exactly orthogonal factors it gives
    the top k components their singular values and the others 0, so both rules choose
    the same components there.

    Computed without forming B A: with B = Q_B R_B and A^T = Q_A R_A (reduced QR),
    B A = Q_B (R_B R_A^T) Q_A^T, so the singular vectors of B A are Q_B and Q_A times
    those of the r x r core, and the two norms reduce to ``U_k^T R_B`` and
    ``V_k^T R_A``: O((d_out + d_in) r^2) per layer instead of an SVD of the
    d_out x d_in product."""
    k = math.ceil(keep * a.shape[0])
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    r_b = torch.linalg.qr(b64).R
    r_a = torch.linalg.qr(a64.T).R
    u, _, vh = torch.linalg.svd(r_b @ r_a.T)
    in_u = torch.linalg.vector_norm(u[:, :k].T @ r_b, dim=0)
    in_v = torch.linalg.vector_norm(vh[:k] @ r_a, dim=0)
    return (in_u * in_v).to(a.dtype)


def singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The r singular values of B A, descending, from the r x r core of
    :func:`svd_importance` (no d_out x d_in product)."""
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    core = torch.linalg.qr(b64).R @ torch.linalg.qr(a64.T).R.T
    return torch.linalg.svdvals(core).to(a.dtype)


IMPORTANCE = {"norms": lambda a, b, keep: importance(a, b), "svd": svd_importance}

# A layer's importance profile for TSFA's schedule: a score for *every* rank component,
# whatever this round's keep ratio, so the mass any keep ratio would drop can be read
# off it. For ``svd`` that is B A's singular values (the best rank-k approximation keeps
# the top k); svd_importance at the round's keep ratio would score every component
# beyond it 0, so every larger keep ratio would seem to gain nothing.
PROFILE = {"norms": importance, "svd": singular_values}


def top_components(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The ``ceil(keep * r)`` components of highest score, ascending (ties: lower
    index first)."""
    k = math.ceil(keep * scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


def component_positions(components: torch.Tensor, a_shape: torch.Size,
                        b_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat positions of the chosen components: whole rows of A (r x d_in) and
    whole columns of B (d_out x r)."""
    d_in = a_shape[1]
    d_out, r = b_shape
    a_pos = (components[:, None] * d_in + torch.arange(d_in)).reshape(-1)
    b_pos = (torch.arange(d_out)[:, None] * r + components[None, :]).reshape(-1)
    return a_pos, b_pos
