"""Server-side building blocks that compose with every method: how a stack of client
tensors becomes one (mean, coordinate-wise median, trimmed mean), and norm clipping
of a client's update (its change to the global state).

Written here rather than taken from a library: Flower's strategies implement these on
flat NumPy lists inside its own server loop, which our runtimes must not depend on;
the few lines below work on named torch tensors for any runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from sfedlora.config import ServerConfig

Combiner = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i T_i, accumulated in float64 in the given (client-id) order."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for w, t in zip(weights, tensors, strict=True):
        acc += w * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def uniform_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return weighted_mean(tensors, [1.0 / len(tensors)] * len(tensors))


def coordinate_median(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count);
    unweighted, so one client cannot buy influence with a large claimed data size."""
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    m = len(tensors)
    mid = (ordered[(m - 1) // 2] + ordered[m // 2]) / 2
    return mid.to(tensors[0].dtype)


def trimmed_mean(fraction: float) -> Combiner:
    """Coordinate-wise mean after dropping the ``floor(fraction * m)`` largest and
    smallest values of each coordinate (unweighted)."""

    def combine(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        m = len(tensors)
        k = min(math.floor(fraction * m), (m - 1) // 2)
        ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
        return ordered[k : m - k].mean(dim=0).to(tensors[0].dtype)

    return combine


def combiner_for(cfg: ServerConfig) -> Combiner:
    if cfg.aggregation == "median":
        return coordinate_median
    if cfg.aggregation == "trimmed_mean":
        return trimmed_mean(cfg.trim_fraction)
    return weighted_mean


def _reference_of(name: str, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = reference.get(name)
    if ref is None:
        raise KeyError(f"no reference value for {name!r}: a change can only be measured "
                       "against what the client started from")
    return ref


def update_norm(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of the change an upload makes, over all its tensors, measured against
    ``reference``: what the client started from (its download, and its own draw for
    tensors it was not sent). A tensor without a reference is an error, never a change
    from zero (which would count a freshly drawn A as an update)."""
    total = 0.0
    for name, t in tensors.items():
        total += float((t.double() - _reference_of(name, reference).double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                max_norm: float) -> dict[str, torch.Tensor]:
    """Scale the change so its L2 norm is at most ``max_norm``."""
    norm = update_norm(tensors, reference)
    if norm <= max_norm:
        return tensors
    factor = max_norm / norm
    clipped = {}
    for name, t in tensors.items():
        base = _reference_of(name, reference).to(t.dtype)
        clipped[name] = base + (t - base) * factor
    return clipped
