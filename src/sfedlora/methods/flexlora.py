"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): heterogeneous ranks by SVD.

Client k of rank r_k (``lora.client_ranks``) trains a rank-r_k adapter. The server forms
each layer's full weighted update ``M = sum_k p_k B_k A_k`` (p_k ~ data size) and
re-factorises it by SVD (:func:`~sfedlora.methods.factorize.svd_factors`): the global
state holds the top r_max = ``lora.rank`` components, and client k downloads the
leading r_k of them, which is the rank-r_k truncated SVD of M. Unlike HetLoRA's padded
averages of A and B, the products are combined, so there are no cross terms; unlike
FLoRA, nothing is merged into the base and downloads do not grow with the clients.
The head is averaged as in FedIT.

Stated deviations: every client trains at the scale of r_max (as in HetLoRA here), so
a truncated adapter is exactly the leading components of the full one; the SVD's
singular values go to B (``B = U S``, ``A = V^T``), a convention the paper leaves open.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfedlora.aggregation.combiners import Combiner, weighted_mean
from sfedlora.methods.base import Method, Part, Traits, Update, part_of
from sfedlora.methods.factorize import lora_pairs, svd_factors


class FlexLoRA(Method):
    """mixed ranks: SVD of sum_k p_k B_k A_k, each client gets its rank's truncation"""

    traits = Traits(mixed_ranks=True, secure_aggregation_refusal="takes the SVD of the "
                    "clients' own products B_k A_k")

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: Sequence[Update],
                  combine: Combiner = weighted_mean) -> dict[str, torch.Tensor]:
        """The head's weighted mean; per layer the top-r_max SVD of the weighted sum of
        the clients' products (uploads are zero-padded to r_max, which adds nothing
        to a product)."""
        updates = sorted(updates, key=lambda u: u.client_id)
        new = dict(global_state)
        if not updates:
            return new
        weights = self.weights(updates)
        for name in updates[0].tensors:
            if part_of(name) is Part.HEAD:
                new[name] = combine([u.tensors[name] for u in updates], weights,
                                    [u.present.get(name) for u in updates])
        for a_name, b_name in lora_pairs(updates[0].tensors):
            product = torch.zeros(global_state[b_name].shape[0], global_state[a_name].shape[1],
                                  dtype=torch.float64)
            for p, u in zip(weights, updates, strict=True):
                product += p * (u.tensors[b_name].double() @ u.tensors[a_name].double())
            new[a_name], new[b_name] = svd_factors(product, global_state[a_name].shape[0],
                                                   global_state[a_name].dtype)
        return new

    def check_config(self, cfg) -> None:
        refused = [
            (cfg.server.aggregation != "mean", "server.aggregation",
             "the SVD is of the weighted sum of the clients' products"),
            (cfg.privacy.enabled, "privacy.enabled",
             "noise on the SVD's factors is not calibrated to a clipped client change"),
        ]
        self.refuse(refused)
