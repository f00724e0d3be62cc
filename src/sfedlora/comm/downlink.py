"""Sparse, delta-coded downloads that the server and every client agree on bit for bit
(``comm.down.delta: true``).

The server keeps a *published* state P: what every up-to-date client holds. Each time
aggregation changes the global state G, the server publishes the change through the
download codec (top-k and/or quantisation of G - P): ``U_t = encode(G, reference=P)``
and ``P <- decode(U_t, reference=P)``. A client applies the same payloads with the
same ``decode``, so both sides compute the same floating-point operations on the same
inputs and hold the same bits. What a message dropped stays in G - P and goes out in
a later round (error feedback by construction).

A client's download (:class:`Downlink.message`) is one of:

- the chain ``U_{j+1} .. U_t`` when it holds version j, within the last
  ``comm.down_history`` versions, and the chain is smaller than a copy of P. Version 0
  is the seeded initial state, which every client draws itself, so a client that never
  downloaded starts from it; the message carries its digest, which the client checks.
  Version 0 may hold *pending* tensors, references only (FedSA's A before the first
  aggregation: the mean of the clients' own draws, :meth:`AdapterInits.downlink_origin`):
  the first published A is coded as a change against it, and until then a client keeps
  training from its own draw, so a download does not hand pending tensors over;
- a **refresh**: P itself, lossless, for a client absent too long, or whose chain
  would cost more than the copy.

The server remembers only each client's version, an int; a client that did not reply
may or may not have applied its download, so the server forgets its version and
refreshes it next time. The client checks that a chain starts at the version it holds
and refuses one that does not, so a disagreement can never pass silently.

Every message is safetensors: each nested payload a uint8 tensor, the versions in the
header.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from sfedlora.core import wire
from sfedlora.core.codecs import Codec
from sfedlora.core.codecs import decode as codec_decode
from sfedlora.core.wire import MessageError

FORMAT = "sfedlora-downlink-1"
REFRESH, EXTRAS, UPDATE, VERSIONS = "refresh", "extras", "update.", "versions"

Tensors = dict[str, torch.Tensor]


def _as_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else \
        torch.zeros(0, dtype=torch.uint8)


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


def digest(tensors: Tensors) -> str:
    """SHA-256 of the tensors' names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def is_downlink(message: bytes) -> bool:
    try:
        return wire.read_meta(message).get("downlink") == FORMAT
    except MessageError:
        return False


class Downlink:
    """The server's side (module docstring)."""

    def __init__(self, codec: Codec, history: int, state: Tensors,
                 origin: Tensors | None = None):
        """``state``: the server's first state; ``origin``: version 0 (default
        ``state``), which may add pending tensors, references the server does not hold."""
        self.codec, self.history = codec, history
        self.version = 0
        origin = state if origin is None else origin
        self.published = {n: t.detach().clone() for n, t in origin.items()}  # version 0
        self.pending = set(origin) - set(state)
        self.origin = digest(self.published)
        self.dense_bytes = sum(t.numel() * t.element_size() for t in origin.values())
        self.updates: deque[tuple[int, bytes]] = deque(maxlen=history)
        self.held: dict[int, int] = {}  # client id -> the version it holds
        self._refresh: bytes | None = None

    def publish(self, state: Tensors) -> None:
        """The global state changed: publish its change as the next version, and
        pending tensors stop being references only. A tensor outside version 0 (no
        reference to code a change against) goes first as a lossless version of its
        own: a top-k of its values, rather than of a change, would leave it mostly
        zero. FedSA's A is not one: version 0 holds the mean of the clients' draws."""
        if new := {n: t for n, t in state.items() if n not in self.published}:
            self._append(wire.encode(new))
        self._append(self.codec.encode(state, reference=self.published))
        self.pending -= set(state)

    def _append(self, payload: bytes) -> None:
        self.published = apply(payload, self.published)
        self.version += 1
        self.updates.append((self.version, payload))
        self._refresh = None
        # what a copy costs, against which a chain is weighed
        self.dense_bytes = sum(t.numel() * t.element_size() for t in self.published.values())

    def message(self, cid: int, extras: Tensors, advance: bool = True) -> bytes:
        """Client ``cid``'s download: what takes it from the version it holds to the
        published one, plus ``extras`` (lossless); ``advance``: it now holds that."""
        held = self.held.get(cid)
        # the versions as a tensor too: a message that carries nothing new is then not
        # empty (an empty safetensors message has no header)
        tensors = {VERSIONS: torch.tensor([self.version], dtype=torch.int64)}
        if extras:
            tensors[EXTRAS] = _as_tensor(wire.encode(extras))
        chain = self._chain(held)
        if chain is None:
            if self._refresh is None:
                self._refresh = wire.encode(self.published)
            tensors[REFRESH] = _as_tensor(self._refresh)
            start = None
        else:
            tensors |= {f"{UPDATE}{i}": _as_tensor(p) for i, p in enumerate(chain)}
            start = 0 if held is None else held
        if advance:
            self.held[cid] = self.version
        return wire.encode(tensors, {"downlink": FORMAT, "from": start, "to": self.version,
                                     "origin": self.origin, "pending": sorted(self.pending)})

    def _chain(self, held: int | None) -> list[bytes] | None:
        """The payloads from ``held`` (None: the seeded version 0) to now; None where
        a refresh is due."""
        held = 0 if held is None else held
        if held > self.version:
            return None
        if held < self.version - len(self.updates):
            return None  # older than the history kept
        chain = [p for v, p in self.updates if v > held]
        return chain if sum(len(p) for p in chain) < self.dense_bytes else None

    def forget(self, cid: int) -> None:
        """Client ``cid`` did not reply: it may or may not hold what it was sent."""
        self.held.pop(cid, None)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "published": self.published,
                "updates": [[v, _as_tensor(p)] for v, p in self.updates],
                "held": dict(self.held), "origin": self.origin,
                "pending": sorted(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.published = dict(state["published"])
        self.dense_bytes = sum(t.numel() * t.element_size() for t in self.published.values())
        self.updates = deque(((int(v), _as_bytes(p)) for v, p in state["updates"]),
                             maxlen=self.history)
        self.held = {int(c): int(v) for c, v in state["held"].items()}
        self.origin = str(state["origin"])
        self.pending = set(state.get("pending", []))
        self._refresh = None


def apply(payload: bytes, tensors: Tensors) -> Tensors:
    """One published version applied to ``tensors`` (the same operations on both
    sides); a version may carry only some tensors (new ones, whole)."""
    return {**tensors, **codec_decode(payload, reference=tensors)}


def receive(message: bytes, held: dict | None, initial: Callable[[], Tensors]
            ) -> tuple[Tensors, dict]:
    """The client's side: a download applied to what the client holds (``held``:
    ``{"version": int, "tensors": ...}`` from its state; None: version 0, which
    ``initial()`` draws). Returns the tensors it now holds, less those still pending,
    plus any extras, and its new ``held``. Refuses a chain that does not start at the
    held version, and a version 0 whose digest is not the server's."""
    meta, pieces = wire.read_meta(message), wire.decode(message)
    if REFRESH in pieces:
        tensors = wire.decode(_as_bytes(pieces[REFRESH]))
    else:
        have = 0 if held is None else held["version"]
        if meta.get("from") != have:
            raise MessageError(f"the download continues version {meta.get('from')} but this "
                               f"client holds version {have}")
        if held is None:
            tensors = initial()
            if digest(tensors) != meta.get("origin"):
                raise MessageError("this client's seeded initial state differs from the "
                                   "server's (version 0); is its config the server's?")
        else:
            tensors = held["tensors"]
        updates = sorted((k for k in pieces if k.startswith(UPDATE)),
                         key=lambda k: int(k[len(UPDATE):]))
        for key in updates:
            tensors = apply(_as_bytes(pieces[key]), tensors)
    extras = wire.decode(_as_bytes(pieces[EXTRAS])) if EXTRAS in pieces else {}
    pending = set(meta.get("pending", []))
    shared = {n: t for n, t in tensors.items() if n not in pending}
    return {**shared, **extras}, {"version": int(meta["to"]), "tensors": tensors}
