"""FLoCoRA's affine per-output-channel quantisation, and bit packing for the wire.

Each output channel (row) of a tensor gets a float32 ``scale`` s and ``offset`` o, and
every value becomes a code ``q = clamp(round((x - o) / s), 0, 2**b - 1)`` decoded as
``x' = q * s + o``:

* A row whose range ``[lo, hi]`` contains 0 uses an **integer zero point** z: o = -z*s,
  with z and s chosen so that the grid covers the range (``-z*s <= lo`` and
  ``(2**b - 1 - z)*s >= hi``) and s is as small as such a grid allows. Code z decodes
  to exactly 0, so the zeros of a delta-coded upload stay zeros (a float zero point,
  as in FLoCoRA's reference code, moves them by up to s/2). Then
  ``(hi - lo) / (2**b - 1) <= s <= (hi - lo) / (2**b - 2)``.
* Any other row uses ``o = lo`` and ``s = (hi - lo) / (2**b - 1)``.
* A constant row gets s = 1 and is reproduced exactly.

Codes are computed from ``x - o`` in float64, never from ``x / s + z``, whose two large
terms cancel (a row 10 + 0.001*u at 8 bits lost 46% over the bound that way). So
``|x - x'| <= s/2`` up to the float32 rounding of the decoded value (a few ulp of |x|).
Values are given with their group, so the same rule serves the rows of a dense tensor
and the blocks of kept entries of a sparse one (:data:`.codec.SPARSE_BLOCK`; the range
is then over the group's values).
"""

from __future__ import annotations

import numpy as np
import torch

BITS = (2, 4, 8)


def row_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` per row (float32) for rows spanning ``[lo, hi]``."""
    qmax = 2**bits - 1
    lo64, hi64 = lo.double(), hi.double()
    span = hi64 - lo64
    scale = span / qmax
    offset = lo64.clone()
    # Rows that contain 0: the best integer zero point is floor or ceil of the real one.
    straddle = (lo64 <= 0) & (hi64 >= 0) & (span > 0)
    ideal = (-lo64 / span.where(span > 0, 1.0) * qmax).clamp(0, qmax)
    best = torch.full_like(scale, torch.inf)
    best_z = torch.zeros_like(scale)
    for z in (ideal.floor(), ideal.ceil()):
        below = torch.where(z > 0, -lo64 / z.clamp(min=1),
                            torch.where(lo64 == 0, 0.0, torch.inf))
        above = torch.where(z < qmax, hi64 / (qmax - z).clamp(min=1),
                            torch.where(hi64 == 0, 0.0, torch.inf))
        s = torch.maximum(below, above)
        better = s < best
        best, best_z = torch.where(better, s, best), torch.where(better, z, best_z)
    scale = torch.where(straddle, best, scale).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # o = -(z * s) in float32, so that code z decodes to (z*s) - (z*s) = 0 exactly.
    offset = torch.where(straddle, -(best_z.float() * scale), offset.float())
    return scale, offset


def quantize_rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int, bits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, offset)``: uint8 codes for ``values`` (1-D float32) whose groups
    (output channels, or blocks) are ``rows``; scale and offset are float32 per group."""
    qmax = 2**bits - 1
    lo = torch.full((num_rows,), torch.inf).scatter_reduce(0, rows, values, "amin")
    hi = torch.full((num_rows,), -torch.inf).scatter_reduce(0, rows, values, "amax")
    empty = torch.isinf(lo)  # rows with no kept entry
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    scale, offset = row_grid(lo, hi, bits)
    steps = (values.double() - offset.double()[rows]) / scale.double()[rows]
    q = torch.clamp(torch.round(steps), 0, qmax)
    return q.to(torch.uint8), scale, offset


def dequantize_rows(q: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    """``q * scale + offset`` per row, in float32 (the arithmetic that makes a zero
    point's code decode to exactly 0)."""
    return q.to(torch.float32) * scale[rows] + offset[rows]


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
