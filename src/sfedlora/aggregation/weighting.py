"""How much each client's update counts: the weighting schemes a method names
(``Traits.weighting``). A scheme turns what a client knows of itself (its number of
training examples and its uploaded tensors) into an unnormalised weight; the server
normalises the weights of a round's updates, and secure aggregation's clients
pre-weight their uploads with the same number (the server divides the masked sum by
the sum of the weights).

Written here because these are the methods' formulas (FedAvg's data-size weights,
FedSA-LoRA's uniform mean, HetLoRA's ``||B_k A_k||_F``), not a library's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def product_norm(tensors: Tensors) -> float:
    """``sqrt(sum over layers ||B A||_F^2)`` of one client's adapter (HetLoRA)."""
    total = 0.0
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        total += float((b.double() @ a.double()).pow(2).sum())
    return total**0.5


# scheme -> (num_examples, tensors) -> unnormalised weight
SCHEMES: dict[str, Callable[[int, Tensors], float]] = {
    "examples": lambda num_examples, tensors: float(num_examples),  # p_k ~ n_k
    "uniform": lambda num_examples, tensors: 1.0,  # p_k = 1/m
    "product_norm": lambda num_examples, tensors: product_norm(tensors),  # HetLoRA
}
# the schemes whose weights are always integers (summed exactly under secure aggregation)
INTEGER_SCHEMES = frozenset({"examples", "uniform"})


def client_weight(scheme: str, num_examples: int, tensors: Tensors) -> float:
    """A client's unnormalised weight under ``scheme``, from what it knows itself."""
    return SCHEMES[scheme](num_examples, tensors)


def normalised(scheme: str, clients: Sequence[tuple[int, Tensors]]) -> list[float]:
    """The weights of ``(num_examples, tensors)`` per client, summing to one; where
    they sum to zero (HetLoRA's first round: every B is zero), equal weights."""
    raw = [client_weight(scheme, n, t) for n, t in clients]
    total = sum(raw)
    if total == 0:
        return [1.0 / len(raw)] * len(raw)
    return [w / total for w in raw]
