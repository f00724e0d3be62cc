"""FDLoRA: a personal adapter per client beside the global one, fused for evaluation
(:mod:`.method` the description, :mod:`.fusion` the personal copy and the search)."""

from sfedlora.methods.fdlora.method import FDLoRA

__all__ = ["FDLoRA"]
