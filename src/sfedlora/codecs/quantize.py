"""FLoCoRA's affine per-output-channel quantisation, and bit packing for the wire.

Each output channel (row) c of a tensor gets a float scale and zero point:
``scale = (max_c - min_c) / (2**b - 1)``, ``zero = -min_c / scale``,
``q = clamp(round(x / scale + zero), 0, 2**b - 1)`` and ``x' = (q - zero) * scale``, so
``|x - x'| <= scale / 2``. A constant row gets scale 1 and is reproduced exactly.
Values are given with their row, so the same rule serves dense tensors and the kept
entries of a sparse one (the range is then over the kept entries of the row).
"""

from __future__ import annotations

import numpy as np
import torch

BITS = (2, 4, 8)


def quantize_rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int, bits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, zero)``: uint8 codes for ``values`` (1-D float32) whose output
    channels are ``rows``; scale and zero are float32 per channel."""
    qmax = 2**bits - 1
    lo = torch.full((num_rows,), torch.inf).scatter_reduce(0, rows, values, "amin")
    hi = torch.full((num_rows,), -torch.inf).scatter_reduce(0, rows, values, "amax")
    empty = torch.isinf(lo)  # rows with no kept entry
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    q = torch.clamp(torch.round(values / scale[rows] + zero[rows]), 0, qmax)
    return q.to(torch.uint8), scale, zero


def dequantize_rows(q: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) - zero[rows]) * scale[rows]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """``8 // bits`` codes per byte, the first in the lowest bits."""
    if bits == 8:
        return q.astype(np.uint8)
    per = 8 // bits
    padded = np.zeros(-(-q.size // per) * per, dtype=np.uint8)
    padded[: q.size] = q
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    codes = (packed[:, None] >> shifts) & np.uint8(2**bits - 1)
    return codes.reshape(-1)[:count]
