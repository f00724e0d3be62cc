"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking, mixed ranks.

Every round each client trains a fresh LoRA (A drawn anew, B zero) of its own rank r_i
on the current base weights, with the scale gamma_i of its own rank. By default gamma_i
= 2 for every rank, as in the official code (``lora_alpha = 2 * r_i``, scaling rule
``fixed`` with alpha 2); ``lora.scaling=lora`` gives gamma_i = alpha / r_i (alpha 16:
16 at rank 1, 0.25 at rank 64, so low-rank clients take far larger effective steps).
The server stacks the factors,

    A_s = [p_1 gamma_1 A_1; ...; p_k gamma_k A_k]   (rows)
    B_s = [B_1, ..., B_k]                           (columns),

so that ``B_s A_s = sum_i p_i gamma_i B_i A_i`` exactly (no cross terms, unlike averaging
A and B separately), and every client merges ``B_s A_s`` into its base weights. The scale
is folded into A_s, so the merged update needs no scale of its own whatever the ranks.
The stacked rank is the sum of the participating clients' ranks, so what a client
downloads grows with the number of clients: the stacked factors of every round it has
not received yet. The task head is averaged as in FedIT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfedlora.aggregation.combiners import Combiner, weighted_mean
from sfedlora.methods.base import ALL_PARTS, Method, Part, Roles, Traits, Update


class FLoRA(Method):
    """fresh LoRA each round; stacked factors merged into the base (mixed ranks)"""

    roles = Roles(shared=ALL_PARTS, fresh=frozenset({Part.A, Part.B}))
    traits = Traits(
        secure_aggregation_refusal="stacks each client's factors; their sum is not the "
        "stacked matrix",
        mixed_ranks=True, a_init_modes=("independent",),
        a_init_note="each client draws a fresh A every round",
        # The official code sets lora_alpha = 2 * r_i: gamma = 2 at every client rank.
        scaling="fixed",
        # The server never sees a fresh A, so lossy uploads are coded as values, not
        # changes.
        comm={"up": {"delta": False}},
        batched_refusal="each client's factors are merged into the base weights the "
        "clients share, at the client's own scale")

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: Sequence[Update],
        combine: Combiner = weighted_mean,
    ) -> dict[str, torch.Tensor]:
        """The head's weighted mean; A and B leave the state (they are merged instead)."""
        new = super().aggregate(global_state, updates, combine)
        return {n: t for n, t in new.items() if n in global_state}

    def merge_factors(self, updates: Sequence[Update], cfg) -> dict[str, torch.Tensor]:
        """What every client merges after this round: the stacked factors."""
        cids = [u.client_id for u in updates]
        return stack(updates, self.weights(updates), [cfg.client_rank(c) for c in cids],
                     [cfg.client_gamma(c) for c in cids])

    def server_stage(self, cfg, layout, network):
        from sfedlora.methods.merging import MergeHistory

        return MergeHistory(self, cfg)

    def client_stage(self, cfg, worker):
        from sfedlora.methods.merging import BaseMerger

        return BaseMerger(cfg, worker)

    def check_config(self, cfg) -> None:
        """Clients merge the downloaded factors into their base weights and start
        every round from a fresh adapter; refuse settings that break either."""
        from sfedlora.methods.merging.stages import merge_refusals

        self.refuse([
            *merge_refusals(cfg),
            (cfg.local.keep_optimizer_state, "local.keep_optimizer_state",
             "every round starts from a fresh adapter"),
            (cfg.codec("up").delta, "comm.up.delta",
             "the server never sees a client's fresh A, so a change to it cannot be decoded"),
        ])


def stack(updates: Sequence[Update], weights: Sequence[float], ranks: Sequence[int],
          scales: Sequence[float]) -> dict[str, torch.Tensor]:
    """Stacked factors per adapted layer, under the layer's ``lora_A`` / ``lora_B``
    names: ``A_s`` of shape (sum r_i, in) and ``B_s`` of shape (out, sum r_i), with
    ``B_s A_s = sum_i p_i gamma_i B_i A_i``. ``updates[i]`` holds client i's factors
    zero-padded to the server's rank; only its leading ``ranks[i]`` components are used.
    """
    out: dict[str, torch.Tensor] = {}
    for name in updates[0].tensors:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        out[name] = torch.cat([p * g * u.tensors[name][:r]
                               for u, p, r, g in zip(updates, weights, ranks, scales,
                                                     strict=True)])
        out[b_name] = torch.cat([u.tensors[b_name][:, :r]
                                 for u, r in zip(updates, ranks, strict=True)], dim=1)
    return out
