"""FLoRA: stacking, mixed ranks, merging into the base weights. The stacking rule lives
here (:mod:`.method`); the merge arithmetic, the server's merge history and the
clients' base-weight merging are shared with FedEx-LoRA (:mod:`sfedlora.methods.merging`)."""

from sfedlora.methods.flora.method import FLoRA, stack

__all__ = ["FLoRA", "stack"]
