"""Server-side execution: hold the global state, check and combine uploads.

The combining rule is the method's (:meth:`Method.aggregate`); the server adds what
any method needs: decoding bytes, rejecting malformed updates with a logged reason,
and skipping a round that has fewer than ``min_clients`` good updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from sfedlora import wire
from sfedlora.methods import Method, Part, Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    client_id: int
    num_examples: int
    payload: bytes


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    applied: bool = False


class Server:
    def __init__(self, method: Method, state: dict[str, torch.Tensor],
                 shapes: dict[str, tuple[int, ...]],
                 names_for: Callable[[Iterable[Part]], list[str]], min_clients: int = 1):
        """``names_for(parts)`` lists the tensor names of those parts (the model's
        layout); ``shapes`` maps every adapter tensor name to its shape."""
        self.method, self.state, self.shapes = method, state, shapes
        self.names_for, self.min_clients = names_for, min_clients

    def download(self) -> bytes:
        """The message every sampled client receives: the current shared state."""
        return wire.encode(self.state)

    def check(self, reply: Reply, expected: set[str]) -> Update:
        """Decode one reply; raise ValueError with the reason if it is malformed."""
        tensors = wire.decode(reply.payload)
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"unexpected tensor names (missing {missing[:3]}, extra {extra[:3]})")
        for name, t in tensors.items():
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {self.shapes[name]}")
            if not t.is_floating_point():
                raise ValueError(f"{name}: dtype {t.dtype} is not floating point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: non-finite values")
        if reply.num_examples <= 0:
            raise ValueError(f"num_examples={reply.num_examples} must be positive")
        return Update(reply.client_id, reply.num_examples, tensors)

    def aggregate(self, round_idx: int, replies: list[Reply]) -> AggregationReport:
        expected = set(self.names_for(self.method.plan(round_idx).upload))
        report, updates = AggregationReport(), []
        for reply in sorted(replies, key=lambda r: r.client_id):
            try:
                updates.append(self.check(reply, expected))
                report.accepted.append(reply.client_id)
            except (ValueError, wire.MessageError) as exc:
                report.rejected[reply.client_id] = str(exc)
                log.warning("round %d: rejected update of client %d: %s",
                            round_idx, reply.client_id, exc)
        if len(updates) < self.min_clients:
            log.warning("round %d: %d good updates < min_clients=%d; global state unchanged",
                        round_idx, len(updates), self.min_clients)
            return report
        self.state = self.method.aggregate(self.state, updates)
        report.applied = True
        return report
