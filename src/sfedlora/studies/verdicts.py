"""How a study turns readings into verdicts: a ratio against its target, and the
choice among candidates that meet a constraint (a latency budget) by a validation
loss, so that no test figure enters a choice."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol


def within(ratio: float, tolerance: float) -> bool:
    """``ratio`` within ``tolerance`` of 1 on either side (a budget that should be
    spent, not only kept)."""
    return abs(ratio - 1) <= tolerance


def at_most_over(ratio: float, tolerance: float) -> bool:
    """``ratio`` at most ``tolerance`` over 1 (a budget that must be kept)."""
    return ratio - 1 <= tolerance


class Candidate(Protocol):
    arm: str
    val_loss: float | None
    latency_ratio: float


def lowest_admissible(candidates: Sequence[Candidate],
                      admissible: Callable[[float], bool]) -> str | None:
    """The arm of lowest validation loss among the candidates whose ratio is
    ``admissible`` (ties: the first); None if none is. A missing or non-finite loss
    never wins."""
    feasible = [c for c in candidates if admissible(c.latency_ratio)
                and c.val_loss is not None and math.isfinite(c.val_loss)]
    return min(feasible, key=lambda c: c.val_loss).arm if feasible else None
