"""FLoRA: stacking, mixed ranks, merging into the base weights. Everything FLoRA needs
beyond a method description lives here: the stacking rule (:mod:`.method`), the merge
arithmetic and exact export (:mod:`.merging`), and the server's merge history and the
clients' base-weight merging (:mod:`.hooks`)."""

from sfedlora.methods.flora.method import FLoRA, stack

__all__ = ["FLoRA", "stack"]
