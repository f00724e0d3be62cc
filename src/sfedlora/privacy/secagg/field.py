"""Arithmetic of secure aggregation: integers mod 2^32, quantisation, and masks.

A client's upload becomes a vector of integers mod 2^32: each coordinate clipped to
``[-R, R]``, multiplied by the client's weight and rounded to a multiple of the step
``delta`` (round half to even, so the same upload always gives the same integers), and
the weight itself appended (exactly where it is an integer). Sums wrap mod 2^32
(numpy's uint32 addition); the step is chosen so the true sum never leaves
``[-2^31, 2^31)``, so reading the wrapped sum as a signed integer recovers it exactly.

Masks are keystreams of ChaCha20 (from ``cryptography``) keyed by SHA-256 of a secret:
Flower's ``pseudo_rand_gen`` folds its seed into a 32-bit numpy ``RandomState``, which an
observer could brute-force, so it is not used here.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

BITS = 32
HALF = 2 ** (BITS - 1)


def step_for(value_range: float, max_weight: int, clients: int) -> float:
    """The quantisation step that keeps any sum of ``clients`` uploads, each clipped to
    ``[-value_range, value_range]`` and weighted by at most ``max_weight``, inside the
    signed 32-bit range: ``k w (R / delta + 1/2) <= 2^31 - 1``."""
    total = clients * max_weight
    room = (HALF - 1) / total - 0.5
    if room <= 1:
        raise ValueError(f"{clients} clients of weight up to {max_weight} leave no room in "
                         f"{BITS}-bit sums; lower privacy.secure_aggregation_max_weight")
    return value_range / room


def quantize(values: np.ndarray, weight: float, step: float, value_range: float,
             weight_step: float = 1.0) -> tuple[np.ndarray, int]:
    """``round(weight * clip(values) / step)`` and ``round(weight / weight_step)`` (exact
    for an integer weight at weight step 1), as one uint32 vector (two's complement),
    and how many coordinates were clipped."""
    clipped = np.clip(values, -value_range, value_range)
    ints = np.rint(clipped * weight / step).astype(np.int64)
    vector = np.concatenate([ints, np.asarray([np.rint(weight / weight_step)],
                                              dtype=np.int64)])
    return vector.astype(np.uint32), int(np.count_nonzero(clipped != values))


def mean_error(clients: int, step: float, weight_step: float, value_range: float,
               weight_sum: float) -> float:
    """The largest per-coordinate difference between the secure mean ``S' / W'`` and the
    plain weighted mean ``S / W`` of the same (in-range) uploads: each client's rounding
    moves S by at most step/2 and W by at most weight_step/2 (0 for integer weights), so
    ``|S'/W' - S/W| <= (k step/2 + R |W - W'|) / W`` with ``W >= W' - k weight_step/2``."""
    weight_error = 0.0 if weight_step == 1.0 else clients * weight_step / 2
    smallest = weight_sum - weight_error
    if smallest <= 0:
        return float("inf")
    return (clients * step / 2 + value_range * weight_error) / smallest


def signed(total: np.ndarray) -> np.ndarray:
    """A wrapped uint32 sum read back as the signed integers it stands for."""
    out = total.astype(np.int64)
    out[out >= HALF] -= 2 ** BITS
    return out


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint32 words of the ChaCha20 keystream keyed by SHA-256(seed)."""
    key = hashlib.sha256(seed).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, nonce=b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (4 * size)), dtype="<u4").astype(np.uint32)
