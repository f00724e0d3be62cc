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

from sfedlora.settings import ServerConfig

# A combiner gets one tensor per client, the method's weights, and optionally per
# client a boolean mask of the coordinates that client really sent (None: all of them;
# a sparse upload or a lower-rank client's zero padding sends fewer).
Presence = Sequence[torch.Tensor | None] | None
Combiner = Callable[..., torch.Tensor]


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  present: Presence = None) -> torch.Tensor:
    """sum_i w_i T_i, accumulated in float64 in the given (client-id) order. Unsent
    coordinates count with the value they decoded to (the method's own formula: FLASC
    averages zero changes, HetLoRA zero padding)."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for w, t in zip(weights, tensors, strict=True):
        acc += w * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def mean_over_senders(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      present: Presence = None) -> torch.Tensor:
    """Per coordinate, the weighted mean over the clients that sent it:
    sum_{k sent} w_k T_k / sum_{k sent} w_k. A coordinate nobody sent keeps the value it
    decoded to (with delta coding, the global value). Without masks: weighted_mean."""
    if present is None or all(p is None for p in present):
        return weighted_mean(tensors, weights)
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(tensors[0], dtype=torch.float64)
    for w, t, p in zip(weights, tensors, present, strict=True):
        sent = torch.ones_like(t, dtype=torch.bool) if p is None else p
        num += torch.where(sent, w * t.to(torch.float64), 0.0)
        den += w * sent.to(torch.float64)
    out = torch.where(den > 0, num / den.clamp_min(1e-300), tensors[0].to(torch.float64))
    return out.to(tensors[0].dtype)


def uniform_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 present: Presence = None) -> torch.Tensor:
    return weighted_mean(tensors, [1.0 / len(tensors)] * len(tensors))


def _sorted_senders(tensors: Sequence[torch.Tensor], present: Presence
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the values of the clients that sent it in ascending order (the
    rest after them as +inf) and how many there are. A coordinate nobody sent is
    combined over every client (all hold the value they decoded to)."""
    stack = torch.stack([t.to(torch.float64) for t in tensors])
    if present is None or all(p is None for p in present):
        return stack.sort(dim=0).values, torch.full(stack.shape[1:], len(tensors))
    sent = torch.stack([torch.ones_like(t, dtype=torch.bool) if p is None else p.bool()
                        for t, p in zip(tensors, present, strict=True)])
    sent |= ~sent.any(dim=0, keepdim=True)
    ordered = stack.masked_fill(~sent, torch.inf).sort(dim=0).values
    return ordered, sent.sum(dim=0)


def coordinate_median(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      present: Presence = None) -> torch.Tensor:
    """Coordinate-wise median over the clients that sent each coordinate (the mean of
    the two middle values for an even count); unweighted, so one client cannot buy
    influence with a large claimed data size."""
    ordered, count = _sorted_senders(tensors, present)
    low = ordered.gather(0, ((count - 1) // 2).unsqueeze(0))[0]
    high = ordered.gather(0, (count // 2).unsqueeze(0))[0]
    return ((low + high) / 2).to(tensors[0].dtype)


def trimmed_mean(fraction: float) -> Combiner:
    """Coordinate-wise mean, over the clients that sent each coordinate (c of them),
    after dropping the ``min(floor(fraction * c), (c - 1) // 2)`` largest and smallest
    values (unweighted)."""

    def combine(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                present: Presence = None) -> torch.Tensor:
        ordered, count = _sorted_senders(tensors, present)
        cut = torch.minimum(torch.floor(fraction * count.double()).long(), (count - 1) // 2)
        position = torch.arange(len(tensors)).reshape(-1, *[1] * (ordered.dim() - 1))
        kept = (position >= cut) & (position < count - cut)
        total = torch.where(kept, ordered, 0.0).sum(dim=0)
        return (total / (count - 2 * cut)).to(tensors[0].dtype)

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
