"""A codec turns the tensors a method sends into the bytes that cross the wire.

Stages, each optional, applied to every message of one direction:

1. **delta**: send ``x - reference`` where the receiver holds the reference (for
   uploads, the state the client downloaded, which the server also knows). Untouched
   entries then cost nothing and quantisation works on a small range.
2. **top-k**: keep the ``ceil(density * n)`` entries of largest magnitude over *all*
   tensors of the message together (ties: lower position first), or within each tensor
   (``per_tensor``), with their positions (:mod:`.indices`). Dropped entries decode as
   0 (as the reference, with delta).
3. **values**: quantised to 2, 4 or 8 bits (:mod:`.quantize`; 1-D tensors stay
   float32), per output channel where a tensor is sent whole and per block of
   ``SPARSE_BLOCK`` kept values where it is sent sparse; or cast to float16 /
   bfloat16, or float32.

The message is safetensors with at most five flat pieces, each the concatenation over
tensors (``values``: float values; ``codes``: bit-packed quantised values; ``index``;
``scale`` and ``offset``: per channel or block), plus a sixth, ``layout``: a JSON list
of each tensor's name, shape, dtype and stage settings in order. So it is
self-describing, a message of many small tensors pays one header entry per piece rather
than per tensor, and its size is ``len(payload)``. ``layout`` and ``index`` travel
deflated (zlib, RFC 1950; :func:`pack`): the layout repeats long module names (as
plain JSON metadata it was about half of a top-k 1/32, 4-bit FedIT upload of
all-MiniLM-L6-v2's 26 adapter tensors, which fell from 8.0 to 4.2 KB; see
docs/results/communication.md), and varint gaps are far from uniform bytes. A codec that
does nothing writes the plain tensors, byte for byte the message it replaces.

Error feedback (Seide et al. 2014; off by default, FLASC has none) keeps on the sender
what the message lost, ``target - decoded``, and adds it to the next message.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from sfedlora.core import wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.codecs.indices import IndexError_, decode_indices, encode_indices
from sfedlora.core.codecs.quantize import (
    BITS,
    dequantize_rows,
    pack_bits,
    quantize_rows,
    unpack_bits,
)
from sfedlora.core.wire import MessageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PIECES = ("values", "codes", "index", "scale", "offset")
BYTE_PIECES = {"codes": torch.uint8, "index": torch.uint8}
# A sparse tensor's kept values are quantised in blocks of this many (in position
# order), not per output channel: at density 1/16 most of a 384 x 8 B's rows keep 0 or
# 1 entries, and a float32 scale and offset per row cost 16x the 4-bit codes. 64 is
# the block of bitsandbytes' 4-bit blockwise quantisation.
SPARSE_BLOCK = 64
# meta["codec"] of a message whose layout is the deflated piece "layout" (messages
# written before it carry the layout itself there, as a JSON list; both decode)
PACKED = "deflate"
# A layout entry is about 130 bytes; this admits half a million tensors and refuses a
# deflate bomb before it fills memory.
MAX_LAYOUT_BYTES = 1 << 26

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    density: float = 1.0
    bits: int | None = None
    dtype: str = "fp32"
    delta: bool = False
    error_feedback: bool = False
    per_tensor: bool = False  # top-k within each tensor, not over the whole message

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density={self.density} must lie in (0, 1]")
        if self.bits is not None and self.bits not in BITS:
            raise ValueError(f"bits={self.bits} must be one of {BITS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")
        if self.bits is not None and self.dtype != "fp32":
            raise ValueError("quantised values carry no float dtype; set bits or dtype")

    @property
    def lossless(self) -> bool:
        return self.density == 1 and self.bits is None and self.dtype == "fp32"

    @property
    def plain(self) -> bool:
        """Writes the tensors unchanged (the message of an uncompressed run)."""
        return self.lossless and not self.delta

    # --- encoding --------------------------------------------------------------------

    def encode(self, tensors: Tensors, reference: Tensors | None = None,
               meta: dict | None = None, positions: Tensors | None = None) -> bytes:
        """``positions``: the sender's own choice of the flat positions to send per
        tensor (sorted; a tensor not named is sent whole), instead of the top-k (SOFT
        sends whole rank components)."""
        if (self.plain and positions is None) or not tensors:
            return wire.encode(tensors, meta)
        # by name: deflate's output depends on the order, and the order of a state
        # depends on how it was built (a Flower server's differs from the simulator's)
        tensors = {n: tensors[n] for n in sorted(tensors)}
        reference = reference or {}
        delta = {n for n in tensors if self.delta and n in reference}
        values = {n: (t - reference[n] if n in delta else t).reshape(-1).float()
                  for n, t in tensors.items()}
        if positions is not None:
            kept = {n: positions.get(n, torch.arange(v.numel())) for n, v in values.items()}
        else:
            kept = self._top_k(values) if self.density < 1 else None
        out: dict[str, list[torch.Tensor]] = {p: [] for p in PIECES}
        layout = []
        for name, t in tensors.items():
            flat, positions, index_kind, index_bytes = values[name], None, None, 0
            if kept is not None:
                positions = kept[name]
                index_kind, buf = encode_indices(positions.numpy(), flat.numel())
                out["index"].append(torch.from_numpy(buf))
                index_bytes = buf.size
                flat = flat[positions]
            bits = self.bits if self.bits is not None and t.dim() >= 2 else None
            block = 0  # quantisation groups: rows (0) or blocks of kept values
            if bits is not None:
                block = SPARSE_BLOCK if flat.numel() < t.numel() else 0
                groups, num_groups = _groups(positions, t.shape, flat.numel(), block)
                q, scale, offset = quantize_rows(flat, groups, num_groups, bits)
                out["codes"].append(torch.from_numpy(pack_bits(q.numpy(), bits)))
                out["scale"].append(scale)
                out["offset"].append(offset)
            else:
                out["values"].append(flat)
            layout.append([name, list(t.shape), str(t.dtype).removeprefix("torch."),
                           name in delta, index_kind, index_bytes, flat.numel(), bits,
                           block])
        wire_dtype = DTYPES[self.dtype]
        pieces = {p: torch.cat(v).to(wire_dtype if p == "values" else v[0].dtype)
                  for p, v in out.items() if sum(t.numel() for t in v)}
        return pack(pieces, layout, meta)

    def _top_k(self, values: Tensors) -> dict[str, torch.Tensor]:
        """Sorted kept positions per tensor, chosen over all tensors together (or
        within each, ``per_tensor``: A and B each keep the same share, the
        elementwise baseline SOFT's whole components are compared with)."""
        if self.per_tensor:
            return {name: torch.sort(v.abs(), descending=True, stable=True)
                    .indices[:math.ceil(self.density * v.numel())].sort().values
                    for name, v in values.items()}
        magnitudes = torch.cat([v.abs() for v in values.values()])
        k = math.ceil(self.density * magnitudes.numel())
        chosen = torch.sort(magnitudes, descending=True, stable=True).indices[:k].sort().values
        kept, offset = {}, 0
        for name, v in values.items():
            lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + v.numel()]))
            kept[name] = chosen[lo:hi] - offset
            offset += v.numel()
        return kept

    def send(self, tensors: Tensors, reference: Tensors | None, residual: Tensors | None,
             meta: dict | None = None, positions: Tensors | None = None
             ) -> tuple[bytes, Tensors | None]:
        """Encode with error feedback when it is on: returns the payload and the
        residual to keep for the next message (None when feedback is off).

        The residual is kept per tensor: a tensor not sent in this message keeps what
        its last message lost until it is sent again, so methods whose uploads
        alternate between tensors (RoLoRA: B, then A) lose nothing."""
        if not self.error_feedback:
            return self.encode(tensors, reference, meta, positions), None
        residual = residual or {}
        target = {n: t + residual[n] if n in residual else t for n, t in tensors.items()}
        payload = self.encode(target, reference, meta, positions)
        received = decode(payload, reference)
        return payload, {**residual, **{n: target[n] - received[n] for n in target}}


def _groups(positions: torch.Tensor | None, shape: torch.Size, count: int, block: int
            ) -> tuple[torch.Tensor, int]:
    """The quantisation group of each of the ``count`` values sent, and the number of
    groups: the output channel (row) of each value for ``block`` 0, else consecutive
    blocks of ``block`` values."""
    if block:
        return torch.arange(count) // block, -(-count // block)
    numel = math.prod(shape)
    flat = torch.arange(numel) if positions is None else positions
    return flat // (numel // shape[0]), shape[0]


# --- the wire form of the pieces and layout ----------------------------------------


def pack(pieces: Tensors, layout: object, meta: dict | None = None) -> bytes:
    """The message of ``pieces`` (see the module docstring) described by ``layout``,
    with the layout and the index bytes deflated."""
    packed = {**pieces, "layout": _deflate(json.dumps(layout, separators=(",", ":"))
                                           .encode())}
    if "index" in pieces:
        packed["index"] = _deflate(pieces["index"].numpy().tobytes())
    return wire.encode(packed, {**(meta or {}), "codec": PACKED})


def unpack(payload: bytes) -> tuple[Tensors, dict]:
    """The inverse of :func:`pack`: the pieces (``index`` inflated) and the metadata
    with the layout under ``"codec"`` as a list. Other messages come back as
    :func:`wire.decode` reads them. Raises :class:`MessageError` on bad input."""
    pieces, meta = wire.decode(payload), wire.read_meta(payload)
    if meta.get("codec") != PACKED:
        return pieces, meta
    if "layout" not in pieces:
        raise MessageError("a packed codec message needs its 'layout' piece")
    try:
        layout = json.loads(_inflate(pieces.pop("layout"), MAX_LAYOUT_BYTES, "layout"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MessageError(f"the 'layout' piece is not JSON: {exc!r}"[:300]) from None
    if "index" in pieces:
        data = _inflate(pieces["index"], _declared_index_bytes(layout), "index")
        pieces["index"] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    return pieces, {**meta, "codec": layout}


def _declared_index_bytes(layout: object) -> int:
    """The index bytes the layout declares, each tensor's at most what its declared
    shape can need (6 varint bytes a position): the bound for inflating, so that a
    small piece cannot inflate to more than the dense tensors it describes."""
    try:
        total = 0
        for entry in layout:
            if entry[4] is not None:
                size = int(entry[5])
                if not 0 <= size <= 6 * math.prod(int(n) for n in entry[1]):
                    raise ValueError(size)
                total += size
        return total
    except (TypeError, ValueError, IndexError, KeyError):
        raise MessageError("codec header must list the tensors, each with index bytes "
                           "its shape can need") from None


def _deflate(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(data)), dtype=torch.uint8)


def _inflate(piece: torch.Tensor, limit: int, what: str) -> bytes:
    """The bytes a deflated piece holds, refusing more than ``limit`` of them, a
    truncated stream and trailing bytes."""
    if piece.dtype != torch.uint8 or piece.dim() != 1:
        raise MessageError(f"the {what!r} piece must be 1-D uint8")
    stream = zlib.decompressobj()
    try:
        data = stream.decompress(piece.numpy().tobytes(), limit + 1)
    except zlib.error as exc:
        raise MessageError(f"the {what!r} piece is not deflate data: {exc}") from None
    if len(data) > limit:
        raise MessageError(f"the {what!r} piece inflates past the {limit} bytes it may "
                           "hold")
    if not stream.eof or stream.unused_data:
        raise MessageError(f"the {what!r} piece is a truncated or padded deflate stream")
    return data


# --- decoding (self-describing: no codec settings needed) ---------------------------


def decode(payload: bytes, reference: Tensors | None = None,
           spec: dict[str, TensorSpec] | None = None) -> Tensors:
    """Tensors of a message. ``reference`` supplies what delta-coded tensors are
    relative to; with ``spec`` every declared tensor must match a known name, shape and
    dtype before anything is allocated. Raises :class:`MessageError` on bad input."""
    return decode_with_presence(payload, reference, spec)[0]


def decode_with_presence(payload: bytes, reference: Tensors | None = None,
                         spec: dict[str, TensorSpec] | None = None
                         ) -> tuple[Tensors, Tensors]:
    """:func:`decode`, plus for every sparse-coded tensor a boolean mask of the entries
    the sender actually sent (the others decoded as 0 or as the reference). A robust
    combiner needs it: a coordinate median over clients that mostly did not send a
    coordinate would return the reference there."""
    pieces, meta = unpack(payload)
    layout = meta.get("codec")
    if layout is None:
        return pieces, {}
    if not isinstance(layout, list) or set(pieces) - set(PIECES):
        raise MessageError("codec header must list the tensors; pieces are "
                           f"{', '.join(PIECES)}")
    reader = _Reader(pieces)
    out, present = {}, {}
    for entry in layout:
        name = entry[0] if isinstance(entry, list) and entry else "?"
        try:
            out[name], positions = _decode_tensor(entry, reader, reference or {}, spec)
        except MessageError:
            raise
        except (KeyError, TypeError, ValueError, IndexError_, RuntimeError) as exc:
            raise MessageError(f"{name}: malformed encoded tensor ({type(exc).__name__}: "
                               f"{exc})") from None
        if positions is not None:
            mask = torch.zeros(out[name].numel(), dtype=torch.bool)
            mask[positions] = True
            present[name] = mask.reshape(out[name].shape)
    if leftover := reader.leftover():
        raise MessageError(f"message has bytes no tensor describes (in {leftover})")
    return out, present


class _Reader:
    """Consecutive slices of the concatenated pieces, with bounds checks."""

    def __init__(self, pieces: Tensors):
        self.pieces = {k: v.reshape(-1) for k, v in pieces.items()}
        self.offsets = dict.fromkeys(pieces, 0)

    def take(self, piece: str, count: int) -> torch.Tensor:
        # an absent piece is an empty one (the encoder leaves empty pieces out)
        data = self.pieces.get(piece, torch.zeros(0, dtype=BYTE_PIECES.get(piece,
                                                                        torch.float32)))
        start = self.offsets.get(piece, 0)
        if count < 0 or start + count > data.numel():
            raise MessageError(f"piece {piece!r} is too short for the tensors declared")
        self.offsets[piece] = start + count
        return data[start : start + count]

    def leftover(self) -> list[str]:
        return [k for k, v in self.pieces.items() if self.offsets[k] != v.numel()]


def _decode_tensor(entry: list, reader: _Reader, reference: Tensors,
                   spec: dict[str, TensorSpec] | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense tensor, and the positions it was sent at (None: all of them)."""
    # messages written before blocks existed have no ninth field: rows
    name, shape, dtype, delta, index_kind, index_bytes, count, bits, block = (
        entry if len(entry) == 9 else [*entry, 0])
    shape, dtype = tuple(int(s) for s in shape), FLOAT_DTYPES[dtype]
    if spec is not None:
        if name not in spec:
            raise MessageError(f"unexpected tensor {name!r}")
        if (shape, dtype) != (spec[name].shape, spec[name].dtype):
            raise MessageError(f"{name}: declared {shape} {dtype} != {spec[name].shape} "
                               f"{spec[name].dtype}")
    numel = math.prod(shape)
    positions = None
    if index_kind is not None:
        buf = reader.take("index", int(index_bytes))
        if buf.dtype != torch.uint8:
            raise MessageError(f"{name}: index bytes must be uint8")
        positions = torch.from_numpy(decode_indices(index_kind, buf.numpy(), numel))
    expected = numel if positions is None else positions.numel()
    if count != expected:
        raise MessageError(f"{name}: {count} values declared for {expected} entries")
    if bits is not None:
        if bits not in BITS or len(shape) < 2:
            raise MessageError(f"{name}: bits={bits} is not a valid quantisation")
        if block not in (0, SPARSE_BLOCK):
            raise MessageError(f"{name}: quantisation block {block} is not 0 (rows) or "
                               f"{SPARSE_BLOCK}")
        groups, num_groups = _groups(positions, torch.Size(shape), count, block)
        packed = reader.take("codes", -(-count * bits // 8))
        scale = reader.take("scale", num_groups).float()
        offset = reader.take("offset", num_groups).float()
        if packed.dtype != torch.uint8:
            raise MessageError(f"{name}: quantised codes must be uint8")
        q = torch.from_numpy(np.ascontiguousarray(unpack_bits(packed.numpy(), bits, count)))
        values = dequantize_rows(q, groups, scale, offset)
    else:
        values = reader.take("values", count).float()
    if positions is None:
        dense = values
    else:
        dense = torch.zeros(numel, dtype=torch.float32).index_put_((positions,), values)
    if delta:
        if name not in reference:
            raise MessageError(f"{name}: delta-coded but the receiver holds no reference")
        dense = reference[name].reshape(-1).float() + dense
    if not torch.isfinite(dense).all():
        raise MessageError(f"{name}: non-finite values")
    return dense.reshape(shape).to(dtype), positions
