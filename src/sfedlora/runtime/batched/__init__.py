"""Many clients at once on one model: batched local training (``clients.parallel``)."""

from sfedlora.runtime.batched.pool import BatchedPool
from sfedlora.runtime.batched.rows import Unbatchable

__all__ = ["BatchedPool", "Unbatchable"]
