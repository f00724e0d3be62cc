"""The wire form of the protocol's messages: JSON for keys, ciphertexts, shares and
client lists, safetensors for a masked vector (uint32). Exchanges: ``advertise``,
``share``, ``unmask`` travel as requests and replies of their own; the ``mask``
request rides with the round's training download, and the masked vector replaces the
upload."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load, save

from sfedlora.core import wire

ADVERTISE, SHARE, MASK, UNMASK = "advertise", "share", "mask", "unmask"
STAGES = (ADVERTISE, SHARE, UNMASK)  # exchanges that are messages of their own
MASKED = "masked"


def dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def loads(data: bytes):
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise wire.MessageError(f"secure-aggregation message is not JSON: {exc}") from None


def int_keys(mapping: dict) -> dict:
    """JSON object keys back to client ids."""
    return {int(k): v for k, v in mapping.items()}


def encode_masked(vector: np.ndarray) -> bytes:
    return save({MASKED: np.ascontiguousarray(vector, dtype=np.uint32)})


def decode_masked(payload: bytes, size: int) -> np.ndarray:
    """A masked vector of exactly ``size`` uint32 entries, or :class:`MessageError`."""
    try:
        tensors = load(payload)
    except Exception as exc:  # safetensors raises its own error types on bad bytes
        raise wire.MessageError(f"masked upload is not safetensors: {exc}") from None
    vector = tensors.get(MASKED)
    if vector is None or vector.dtype != np.uint32 or vector.shape != (size,):
        got = None if vector is None else (vector.dtype, vector.shape)
        raise wire.MessageError(f"masked upload must be uint32 of shape ({size},), got {got}")
    return vector
