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
