"""Positions of the entries a sparse message keeps, as bytes.

Two encodings, and each tensor of each message uses whichever is smaller:

* **bitmap**: one bit per entry of the tensor, ``ceil(numel / 8)`` bytes; best when
  many entries are kept (density above roughly 1/8 to 1/16).
* **varint**: the gaps between consecutive kept positions (the first gap is the first
  position itself), each written as an unsigned LEB128 varint (7 bits per byte, the
  high bit set on every byte but a number's last); a gap below 128 costs one byte, so
  this wins at low densities.

Written here because neither NumPy nor torch offers vectorised varints; protobuf's are
per-number Python calls, far too slow for millions of indices.
"""

from __future__ import annotations

import numpy as np

BITMAP = "bitmap"
VARINT = "varint"


class IndexError_(ValueError):
    """Index bytes that do not describe valid, strictly increasing positions."""


def bitmap_encode(positions: np.ndarray, numel: int) -> np.ndarray:
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return np.packbits(mask, bitorder="little")


def bitmap_decode(buf: np.ndarray, numel: int) -> np.ndarray:
    if buf.size != (numel + 7) // 8:
        raise IndexError_(f"bitmap of {buf.size} bytes for {numel} entries")
    bits = np.unpackbits(buf, count=numel, bitorder="little")
    return np.flatnonzero(bits).astype(np.int64)


def varint_encode(positions: np.ndarray) -> np.ndarray:
    gaps = np.diff(positions.astype(np.uint64), prepend=np.uint64(0))
    nbytes = np.ones(gaps.size, dtype=np.int64)
    rest = gaps >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max(initial=0))):
        sel = nbytes > j
        low7 = (gaps[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (low7 | more).astype(np.uint8)
    return out


def varint_decode(buf: np.ndarray, numel: int) -> np.ndarray:
    if buf.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = (buf & 0x80) == 0
    if not last[-1]:
        raise IndexError_("varint indices end in the middle of a number")
    number = np.cumsum(last) - last  # which number each byte belongs to
    first_byte = np.flatnonzero(np.r_[True, last[:-1]])
    shift = np.arange(buf.size) - first_byte[number]
    if shift.max() > 5:  # 6 bytes cover 2**42 positions, far beyond any tensor
        raise IndexError_("varint index too long")
    gaps = np.zeros(number[-1] + 1, dtype=np.int64)
    np.add.at(gaps, number, (buf & 0x7F).astype(np.int64) << (7 * shift))
    positions = np.cumsum(gaps)
    if positions.size and ((gaps[1:] <= 0).any() or positions[-1] >= numel):
        raise IndexError_("varint indices are not strictly increasing within the tensor")
    return positions


def encode_indices(positions: np.ndarray, numel: int) -> tuple[str, np.ndarray]:
    """The smaller encoding of sorted, unique ``positions`` (ties go to the bitmap)."""
    bitmap = bitmap_encode(positions, numel)
    varint = varint_encode(positions)
    return (VARINT, varint) if varint.size < bitmap.size else (BITMAP, bitmap)


def decode_indices(kind: str, buf: np.ndarray, numel: int) -> np.ndarray:
    if kind == BITMAP:
        return bitmap_decode(buf, numel)
    if kind == VARINT:
        return varint_decode(buf, numel)
    raise IndexError_(f"unknown index encoding {kind!r}")
