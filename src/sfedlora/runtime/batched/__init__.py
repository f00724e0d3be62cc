"""Many clients at once on one model: batched local training (``clients.parallel``)."""

from sfedlora.modeling.client_rows import Unbatchable
from sfedlora.runtime.batched.pool import BatchedPool

__all__ = ["BatchedPool", "Unbatchable"]
