"""HetLoRA (Cho et al., EMNLP 2024 / arXiv 2401.06432): heterogeneous ranks.

The server keeps rank r_max (``lora.rank``); client k of rank r_k
(``lora.client_ranks``) receives the leading r_k components (``A[:r_k]``,
``B[:, :r_k]``), trains them, and sends them back; the server zero-pads each upload to
r_max and combines with weights proportional to the client's ``||B_k A_k||_F`` (over
all adapted layers), so clients whose adapters carry more signal count more. The head is
combined with the same weights. The paper's rank self-pruning is not implemented.

Deviations, stated where users read them: every client trains at the scale of r_max
(so a truncated adapter is exactly the leading components of the full one), and the
head is weighted by ``||B_k A_k||`` like the factors.
"""

from collections.abc import Sequence

import torch

from sfedlora.methods.base import Method, Update


class HetLoRA(Method):
    name = "hetlora"
    summary = "mixed ranks: truncated download, zero-padded upload, weights ~ ||B_k A_k||_F"
    mixed_ranks = True
    integer_weights = False  # ||B_k A_k||: each client computes its own

    def client_weight(self, num_examples: int, tensors: dict[str, torch.Tensor]) -> float:
        return product_norm(tensors)

    def weights(self, updates: Sequence[Update]) -> list[float]:
        norms = [product_norm(u.tensors) for u in updates]
        total = sum(norms)
        if total == 0:  # first round: every B is zero; fall back to equal weights
            return [1.0 / len(updates)] * len(updates)
        return [n / total for n in norms]


def product_norm(tensors: dict[str, torch.Tensor]) -> float:
    """``sqrt(sum over layers ||B A||_F^2)`` of one client's adapter."""
    total = 0.0
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        total += float((b.double() @ a.double()).pow(2).sum())
    return total**0.5
