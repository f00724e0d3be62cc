"""Merging LoRA factors into the frozen base weights each round, shared by the methods
whose aggregate is exact only there: FLoRA (stacked factors) and FedEx-LoRA (the
residual of averaging A and B separately). :mod:`.factors` holds the arithmetic and the
exact export, :mod:`.stages` the server's merge history and the clients' merger."""

from sfedlora.methods.merging.factors import MergeGap, merged_lora, split_merges
from sfedlora.methods.merging.stages import BaseMerger, MergeHistory

__all__ = ["BaseMerger", "MergeGap", "MergeHistory", "merged_lora", "split_merges"]
