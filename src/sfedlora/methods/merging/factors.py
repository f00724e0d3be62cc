"""Merging LoRA factors into the base weights, on either side (FLoRA, FedEx-LoRA).

The server records one set of factors per round (``{lora_A name: A_s, lora_B name:
B_s}``: FLoRA's stacked clients, FedEx-LoRA's residual); downloads carry every round a
client has not received yet under ``merge.<round>.<name>``. A model's base weights are at some
round: they equal the pretrained weights plus the products ``B_s A_s`` of rounds 1 to
that round, added in order, so every process that applies the same rounds holds
bit-identical weights.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

MERGE_PREFIX = "merge."

Tensors = dict[str, torch.Tensor]


class MergeGap(ValueError):
    """Factors that do not continue the rounds a model's base weights are at."""


def merge_name(round_idx: int, name: str) -> str:
    return f"{MERGE_PREFIX}{round_idx}.{name}"


def split_merges(tensors: Tensors) -> tuple[Tensors, dict[int, Tensors]]:
    """A download's shared tensors, and its merged factors by round."""
    shared: Tensors = {}
    merges: dict[int, Tensors] = {}
    for name, t in tensors.items():
        if name.startswith(MERGE_PREFIX):
            round_idx, inner = name[len(MERGE_PREFIX):].split(".", 1)
            merges.setdefault(int(round_idx), {})[inner] = t
        else:
            shared[name] = t
    return shared, merges


class BaseWeights:
    """The base weights of a model's LoRA layers and the round they are at."""

    def __init__(self, model: torch.nn.Module):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.round = 0

    @torch.no_grad()
    def apply(self, merges: dict[int, Tensors]) -> None:
        """Add ``B_s A_s`` of every round after the current one, in order. Rounds at or
        before the current one are already in the weights and are skipped."""
        for round_idx in sorted(r for r in merges if r > self.round):
            if round_idx != self.round + 1:
                raise MergeGap(f"base weights are at round {self.round}, but the next "
                               f"merged factors are of round {round_idx}")
            for name, a in merges[round_idx].items():
                if ".lora_A." not in name:
                    continue
                b = merges[round_idx][name.replace(".lora_A.", ".lora_B.")]
                layer = self.layers[name.split(".lora_A.")[0]]
                weight = layer.get_base_layer().weight
                delta = b.double() @ a.double()
                if getattr(layer, "fan_in_fan_out", False):  # GPT-2-style Conv1D layout
                    delta = delta.T
                weight += delta.to(device=weight.device, dtype=weight.dtype)
            self.round = round_idx


def merged_lora(merges: dict[int, Tensors], live: Tensors | None = None
                ) -> tuple[Tensors, int]:
    """The whole merged change, plus the ``live`` factors still in the adapter (scale
    folded into A; FedEx-LoRA's averaged A and B), as one LoRA, exactly: per layer the
    SVD of ``sum_s B_s A_s`` keeps its min(stacked rank, out, in) components, and every layer is
    zero-padded to one rank R (returned) so that a PEFT config with ``r = lora_alpha = R``
    (scale 1) reproduces the merged weights. Stacking the rounds' factors instead would
    be exact too, but its rank grows with rounds times clients."""
    deltas: dict[str, torch.Tensor] = {}
    stacked: dict[str, int] = {}
    for factors in [*merges.values(), live or {}]:
        for name, a in factors.items():
            if ".lora_A." in name:
                b = factors[name.replace(".lora_A.", ".lora_B.")]
                deltas[name] = deltas.get(name, 0) + b.double() @ a.double()
                stacked[name] = stacked.get(name, 0) + a.shape[0]
    keep = {n: min(stacked[n], *d.shape) for n, d in deltas.items()}
    rank = max(keep.values(), default=0)
    out: Tensors = {}
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = keep[name]
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a[:k], b[:, :k] = vh[:k], u[:, :k] * s[:k]
        out[name] = a.float()
        out[name.replace(".lora_A.", ".lora_B.")] = b.float()
    return out, rank
