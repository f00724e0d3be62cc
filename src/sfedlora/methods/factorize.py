"""Re-factorising a layer's full update into LoRA factors by SVD (FlexLoRA, FedSVD).

``M = U diag(S) V^T``; the rank-r factors are ``A = V^T[:r]`` (orthonormal rows) and
``B = U[:, :r] diag(S[:r])``, so ``B A`` is the best rank-r approximation of M (exactly M
when rank(M) <= r) and the leading k components of (A, B) are the best rank-k one: a
client of lower rank that keeps the leading components (:mod:`sfedlora.core.ranks`) holds its
own truncated SVD. Computed in float64; ties and signs follow LAPACK, which is
deterministic for the same input on one machine.
"""

from __future__ import annotations

import torch


def svd_factors(product: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes (rank, in) and (out, rank) with ``B A`` the best rank-``rank``
    approximation of ``product`` (out, in); components beyond min(out, in) are zero."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    k = min(rank, s.numel())
    a = torch.zeros(rank, product.shape[1], dtype=torch.float64)
    b = torch.zeros(product.shape[0], rank, dtype=torch.float64)
    a[:k], b[:, :k] = vh[:k], u[:, :k] * s[:k]
    return a.to(dtype), b.to(dtype)


def lora_pairs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """``(lora_A name, lora_B name)`` of every adapted layer in ``tensors``."""
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in tensors if ".lora_A." in n]
