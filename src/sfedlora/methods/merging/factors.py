"""Merging LoRA factors into the base weights, on either side (FLoRA, FedEx-LoRA).

The server records one set of factors per round (``{lora_A name: A_s, lora_B name:
B_s}``: FLoRA's stacked clients, FedEx-LoRA's residual); downloads carry every round a
client has not received yet under ``merge.<round>.<name>``, or, where those factors
would be larger than the dense matrices they add up to, a *refresh*
``merge.1-<last>.<lora_A name>`` holding ``sum_s B_s A_s`` over every round up to
``last`` (the cap :mod:`sfedlora.comm.downlink` puts on its chains). A model's base weights
are at some round: they equal the pretrained weights plus the sum of the products
``B_s A_s`` of rounds 1 to that round, added in order, and every process at a round
holds bit-identical weights, whether it applied each merge or a refresh.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

MERGE_PREFIX = "merge."

Tensors = dict[str, torch.Tensor]


class MergeGap(ValueError):
    """Factors that do not continue the rounds a model's base weights are at."""


# a merge's key: its round, or (1, last) for a refresh (every round up to last, summed
# into dense matrices)
MergeKey = int | tuple[int, int]


def merge_name(round_idx: int, name: str) -> str:
    return f"{MERGE_PREFIX}{round_idx}.{name}"


def refresh_name(last: int, name: str) -> str:
    """The name of a refresh's dense sum for the layer of LoRA tensor ``name``."""
    return f"{MERGE_PREFIX}1-{last}.{name}"


def rounds_of(key: MergeKey) -> tuple[int, int]:
    """The first and last round a merge covers."""
    return (key, key) if isinstance(key, int) else key


def split_merges(tensors: Tensors) -> tuple[Tensors, dict[MergeKey, Tensors]]:
    """A download's shared tensors, and its merged factors by round (a refresh by
    ``(1, last)``)."""
    shared: Tensors = {}
    merges: dict[MergeKey, Tensors] = {}
    for name, t in tensors.items():
        if name.startswith(MERGE_PREFIX):
            label, inner = name[len(MERGE_PREFIX):].split(".", 1)
            first, _, last = label.partition("-")
            key = (int(first), int(last)) if last else int(first)
            merges.setdefault(key, {})[inner] = t
        else:
            shared[name] = t
    return shared, merges


def add_merge(total: Tensors | None, factors: Tensors) -> Tensors:
    """``total`` plus one merge's products, per adapted layer (keyed by its lora_A
    name): each ``B_s A_s`` in float64, rounded to float32, then added in float32. The
    one recurrence both sides run, so a refresh the server sums equals, bit for bit,
    what a model that applied each merge holds."""
    out = dict(total or {})
    for name, a in factors.items():
        if ".lora_A." in name:
            b = factors[name.replace(".lora_A.", ".lora_B.")]
            step = (b.double() @ a.double()).float()
            out[name] = step if name not in out else out[name] + step
    return out


def factor_bytes(factors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in factors.values())


def dense_bytes(factors: Tensors) -> int:
    """The size of the dense matrices ``B A`` of ``factors``' layers."""
    return sum(factors[n.replace(".lora_A.", ".lora_B.")].shape[0] * a.shape[1]
               * a.element_size() for n, a in factors.items() if ".lora_A." in n)


class BaseWeights:
    """The base weights of a model's LoRA layers and the round they are at.

    The weights are always the pretrained ones plus the merged sum (float32,
    :func:`add_merge`), kept beside them: a refresh replaces the sum, a merge adds to
    it, and either way every process at a round holds the same bits. The cost is two
    copies of the adapted layers' weights per process (the pretrained ones and the
    sum)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.round = 0
        self.pretrained = {name: m.get_base_layer().weight.detach().clone()
                           for name, m in self.layers.items()}
        self.merged: Tensors = {}  # lora_A name -> sum of B_s A_s so far (d_out x d_in)

    @torch.no_grad()
    def apply(self, merges: dict[MergeKey, Tensors]) -> None:
        """Add ``B_s A_s`` of every round after the current one, in order; a refresh
        replaces the sum wherever it was. Merges at or before the current round are
        already in the weights and are skipped."""
        keys = sorted((k for k in merges if rounds_of(k)[1] > self.round), key=rounds_of)
        for key in keys:
            first, last = rounds_of(key)
            if isinstance(key, tuple):  # a refresh: the sum itself
                self.merged = {n: t.float() for n, t in merges[key].items()}
            elif first != self.round + 1:
                raise MergeGap(f"base weights are at round {self.round}, but the next "
                               f"merged factors are of round {first}")
            else:
                self.merged = add_merge(self.merged, merges[key])
            self.round = last
        if keys:
            self._write()

    def _write(self) -> None:
        """The layers' weights: pretrained plus the merged sum."""
        for name, total in self.merged.items():
            layer_name = name.split(".lora_A.")[0]
            weight = self.layers[layer_name].get_base_layer().weight
            if getattr(self.layers[layer_name], "fan_in_fan_out", False):  # GPT-2 Conv1D
                total = total.T
            weight.copy_(self.pretrained[layer_name] + total.to(weight.device, weight.dtype))


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
