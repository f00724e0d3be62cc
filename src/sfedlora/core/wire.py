"""Messages between clients and server: dicts of tensors serialised with safetensors.

Every message really is serialised and parsed back, even in the in-process
simulator, so the byte counts in the metrics are ``len(payload)`` of what would
cross a network, and the server only ever sees tensors decoded from bytes (never
unpickled objects).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class MessageError(ValueError):
    """A payload that is not a valid message."""


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, object] | None = None) -> bytes:
    """Serialise a message. An empty message is zero bytes: nothing is sent."""
    if not tensors:
        return b""
    metadata = {"sfedlora": json.dumps(meta or {}, sort_keys=True)}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(cpu, metadata=metadata)


def read_meta(payload: bytes) -> dict[str, object]:
    """The JSON metadata of a message. Read straight from the safetensors header
    (an 8-byte little-endian length, then JSON) because ``safetensors.torch.load``
    returns only the tensors."""
    if not payload:
        return {}
    try:
        size = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + size])
        meta = json.loads(header.get("__metadata__", {}).get("sfedlora", "{}"))
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise MessageError(f"message header is not valid JSON: {exc!r}"[:300]) from None
    if not isinstance(meta, dict):
        raise MessageError("message metadata must be a JSON object")
    return meta


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    """Parse a message back into tensors; raises :class:`MessageError` on bad bytes."""
    if not payload:
        return {}
    try:
        return st_load(payload)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise MessageError(f"payload is not a valid safetensors message: {exc}") from exc
