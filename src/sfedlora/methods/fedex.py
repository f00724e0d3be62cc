"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): exact aggregation.

FedIT averages A and B separately, and ``mean(B_i) mean(A_i) != mean(B_i A_i)``. FedEx-LoRA
keeps FedIT's averages as the new adapter and folds what they miss,

    gamma * (sum_i p_i B_i A_i - B_mean A_mean),

into the frozen base weights of every client, so base plus adapter equals the exact
weighted average of the clients' models. The residual travels as factors of rank
(k + 1) r (``A_s = [p_1 gamma A_1; ...; p_k gamma A_k; -gamma A_mean]``, ``B_s = [B_1, ...,
B_k, B_mean]``), through the merge machinery FLoRA uses
(:mod:`sfedlora.methods.merging`): a client that missed rounds receives every residual
it has not merged yet. The paper sends the residual as a dense matrix; the factors are
the same update, and smaller while (k + 1) r < d_out d_in / (d_out + d_in).
Exported adapters are the merged residuals plus the current adapter as one exact LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfedlora.aggregation.combiners import weighted_mean
from sfedlora.methods.base import Method, Traits, Update


class FedEx(Method):
    """FedIT averages; the residual mean(B_i A_i) - mean(B) mean(A) merged into the base"""

    traits = Traits(a_init_modes=("shared", "independent"),
                    a_init_note="A is averaged, so clients may start from one A or their own",
                    secure_aggregation_refusal="merges the residual of each client's own "
                    "product B_i A_i",
                    batched_refusal="merges into the base weights the clients share")

    def merge_factors(self, updates: Sequence[Update], cfg) -> dict[str, torch.Tensor]:
        return residual_factors(updates, self.weights(updates), cfg.gamma)

    def server_stage(self, cfg, layout, network):
        from sfedlora.methods.merging import MergeHistory

        return MergeHistory(self, cfg)

    def client_stage(self, cfg, worker):
        from sfedlora.methods.merging import BaseMerger

        return BaseMerger(cfg, worker)

    def check_config(self, cfg) -> None:
        from sfedlora.methods.merging.stages import merge_refusals

        self.refuse(merge_refusals(cfg))


def residual_factors(updates: Sequence[Update], weights: Sequence[float],
                     gamma: float) -> dict[str, torch.Tensor]:
    """Per adapted layer, factors with ``B_s A_s = gamma (sum_i p_i B_i A_i - B_mean
    A_mean)``, where the means are the very weighted means the aggregate computed."""
    out: dict[str, torch.Tensor] = {}
    for name in updates[0].tensors:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        a_list = [u.tensors[name] for u in updates]
        b_list = [u.tensors[b_name] for u in updates]
        a_mean, b_mean = weighted_mean(a_list, weights), weighted_mean(b_list, weights)
        out[name] = torch.cat([*(p * gamma * a for p, a in zip(weights, a_list, strict=True)),
                               -gamma * a_mean])
        out[b_name] = torch.cat([*b_list, b_mean], dim=1)
    return out
