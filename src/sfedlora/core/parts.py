"""The parts of a LoRA adapter (A, B and the task head) and which part a tensor is,
from its PEFT name: the vocabulary every layer shares (methods say which parts they
share, keep or freeze; codecs, rank padding and the wire name tensors by part)."""

from __future__ import annotations

from enum import StrEnum


class Part(StrEnum):
    A = "A"
    B = "B"
    HEAD = "head"


A_MARKERS = (".lora_A.", ".lora_embedding_A.", ".vera_lambda_d.")
B_MARKERS = (".lora_B.", ".lora_embedding_B.", ".vera_lambda_b.")


def part_of(name: str) -> Part:
    """Which part an adapter tensor belongs to, from its PEFT name. PEFT's embedding
    LoRA (``lora_embedding_A/B``) has the same roles as A and B (the runtimes refuse
    embedding targets, see :func:`sfedlora.modeling.model.refuse_non_linear_targets`, but a name
    is never mistaken for the head). VeRA's lambda_d scales the (shared, frozen)
    down-projection like A, lambda_b the up-projection like B, so FedSA semantics carry
    over: lambda_d is shared, lambda_b stays local."""
    if any(m in name for m in A_MARKERS):
        return Part.A
    if any(m in name for m in B_MARKERS):
        return Part.B
    return Part.HEAD
