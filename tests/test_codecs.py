"""Message codecs: exact round trips where lossless, the quantisation bound where not,
top-k and index encodings, byte counts, error feedback, and malformed messages."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfedlora.core import wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.codecs import Codec, decode, decode_with_presence
from sfedlora.core.codecs.codec import pack, unpack
from sfedlora.core.codecs.indices import (
    BITMAP,
    VARINT,
    IndexError_,
    encode_indices,
    varint_decode,
    varint_encode,
)
from sfedlora.core.codecs.quantize import pack_bits, unpack_bits


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "m.q.lora_A.default.weight": torch.randn(4, 48, generator=gen),
        "m.q.lora_B.default.weight": torch.randn(48, 4, generator=gen) * 0.01,
        "m.classifier.bias": torch.randn(3, generator=gen),
    }


def _pieces_and_meta(payload: bytes) -> tuple[dict, dict]:
    """The pieces (index inflated) and the metadata, the layout as a list."""
    return unpack(payload)


def test_plain_codec_writes_the_tensors_unchanged():
    t = _tensors()
    payload = Codec().encode(t, meta={"client": 1})
    assert payload == wire.encode(t, meta={"client": 1})
    out = decode(payload)
    assert all(torch.equal(out[n], t[n]) for n in t)


@pytest.mark.parametrize("density", [1.0, 0.3, 0.01])
def test_sparse_fp32_keeps_exact_values_and_zeroes_the_rest(density):
    t = _tensors()
    out = decode(Codec(density=density).encode(t))
    total = sum(v.numel() for v in t.values())
    kept = sum(int((out[n] != 0).sum()) for n in out)
    assert kept == math.ceil(density * total)
    for n in t:
        nz = out[n] != 0
        assert torch.equal(out[n][nz], t[n][nz])  # kept entries are bit-exact


def test_top_k_keeps_the_k_largest_magnitudes_over_all_tensors():
    t = _tensors(3)
    codec = Codec(density=0.05)
    out = decode(codec.encode(t))
    flat = torch.cat([v.reshape(-1) for v in t.values()])
    k = math.ceil(0.05 * flat.numel())
    expected = set(torch.topk(flat.abs(), k).indices.tolist())
    got = set(torch.cat([out[n].reshape(-1) for n in t]).nonzero().flatten().tolist())
    assert got == expected
    # global, not per tensor: B is 100x smaller, so none of it survives
    assert int((out["m.q.lora_B.default.weight"] != 0).sum()) == 0


def test_per_tensor_top_k_keeps_each_tensors_own_largest_share():
    t = _tensors(3)
    out = decode(Codec(density=0.05, per_tensor=True).encode(t))
    for name, value in t.items():
        k = math.ceil(0.05 * value.numel())
        expected = set(torch.topk(value.reshape(-1).abs(), k).indices.tolist())
        assert set(out[name].reshape(-1).nonzero().flatten().tolist()) == expected


def _grids(payload: bytes) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per quantised tensor, the (scale, offset) of each group as sent (a row, or a
    block of kept values) and the block size (0: rows)."""
    pieces, meta = _pieces_and_meta(payload)
    grids, at = {}, 0
    for name, shape, *_, count, bits, block in meta["codec"]:
        if bits is not None:
            groups = -(-count // block) if block else shape[0]
            grids[name] = (pieces["scale"][at:at + groups],
                           pieces["offset"][at:at + groups], block)
            at += groups
    return grids


def _assert_within_half_a_step(x, y, sent, scale, offset, block, bits):
    """|x - x'| <= s/2 per group (a row, or ``block`` consecutive sent entries), up to
    the float32 rounding of the decoded value, and the step is at most
    range / (2**b - 2) (the price of an exact zero point)."""
    eps = torch.finfo(torch.float32).eps
    positions = sent.reshape(-1).nonzero().squeeze(1)
    groups = (torch.arange(positions.numel()) // block if block
              else positions // x.shape[1])
    for g in range(scale.numel()):
        chosen = positions[groups == g]
        xs, ys = x.reshape(-1)[chosen].double(), y.reshape(-1)[chosen].double()
        if xs.numel() == 0:
            continue
        s = float(scale[g])
        if xs.max() > xs.min():
            assert s <= float(xs.max() - xs.min()) / (2**bits - 2) * (1 + 4 * eps)
        # half an ulp for each float32 rounding: q*s, the offset, the sum
        rounding = eps * (xs.abs().max() + (2**bits) * s)
        assert (xs - ys).abs().max() <= s / 2 + rounding


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_quantisation_error_is_within_half_a_step_per_channel(bits, density):
    t = _tensors(1)
    payload = Codec(bits=bits, density=density).encode(t)
    (out, sent), grids = decode_with_presence(payload), _grids(payload)
    for name, x in t.items():
        y = out[name]
        kept = sent.get(name, torch.ones_like(x, dtype=torch.bool))
        if x.dim() == 1:
            assert torch.equal(y[kept], x[kept])  # 1-D tensors stay float32
            continue
        assert grids[name][2] == (64 if density < 1 else 0)  # blocks where sparse
        _assert_within_half_a_step(x, y, kept, *grids[name], bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_bound_holds_on_rows_far_from_zero(bits):
    """Rows 10 + 0.001*u: the codes must come from x - lo, not x/s + z, whose large
    terms cancel in float32 (1.46x the bound at 8 bits before)."""
    gen = torch.Generator().manual_seed(3)
    x = 10 + 0.001 * torch.rand(6, 64, generator=gen)
    x[3] = -250 + 0.01 * torch.rand(64, generator=gen)
    payload = Codec(bits=bits).encode({"m.lora_A.default.weight": x})
    y = decode(payload)["m.lora_A.default.weight"]
    # o = lo and s = span / qmax here, so the decoded value q*s + lo is off by at most s/2
    # plus half an ulp for each float32 rounding (of q*s and of the sum)
    span = (x.max(1).values - x.min(1).values).double()
    eps, qmax = torch.finfo(torch.float32).eps, 2**bits - 1
    worst = (x.double() - y.double()).abs().max(1).values
    bound = span / (2 * qmax) * (1 + 2 * eps) + 0.5 * eps * (x.abs().max(1).values + 2 * span)
    assert (worst <= bound).all(), (worst / bound).max()
    scale, offset, block = _grids(payload)["m.lora_A.default.weight"]
    _assert_within_half_a_step(x, y, torch.ones_like(x, dtype=torch.bool), scale, offset,
                               block, bits)
    assert (scale < 0.011).all()  # the grid spans the row, not [0, 10]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("delta", [False, True])
def test_quantisation_keeps_exact_zeros(bits, delta):
    """A zero in a row (an unchanged entry of a delta) decodes to exactly zero."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 40, generator=gen)
    x[:, ::3] = 0.0
    x[2] = torch.rand(40, generator=gen)  # a row with min 0 ...
    x[2, 5] = 0.0
    x[5] = -torch.rand(40, generator=gen)  # ... and one with max 0
    x[5, 7] = 0.0
    x[6] = 0.0  # a constant zero row
    ref = {"m.lora_B.default.weight": torch.zeros_like(x)}
    y = decode(Codec(bits=bits, delta=delta).encode({"m.lora_B.default.weight": x}, ref), ref)
    y = y["m.lora_B.default.weight"]
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))


def test_quantised_message_size_is_bits_per_value_plus_64_bits_per_channel():
    a = {"x.lora_A.default.weight": torch.randn(8, 1000), "x.bias": torch.randn(5)}
    for bits in (2, 4, 8):
        pieces, meta = _pieces_and_meta(Codec(bits=bits).encode(a))
        assert pieces["codes"].dtype == torch.uint8
        assert pieces["codes"].numel() == 8000 * bits // 8
        assert pieces["scale"].dtype == pieces["offset"].dtype == torch.float32
        assert pieces["scale"].numel() == pieces["offset"].numel() == 8
        assert pieces["values"].dtype == torch.float32 and pieces["values"].numel() == 5
        # tensors go by name: x.bias, then x.lora_A
        assert [e[7:] for e in meta["codec"]] == [[None, 0], [bits, 0]]  # bits, rows


def test_sparse_quantised_tensor_pays_one_scale_and_offset_per_block_of_64():
    """A 384 x 8 B at density 1/16 keeps 192 entries, about one per row: per-row grids
    would cost 384 x 8 bytes beside 96 bytes of 4-bit codes; blocks of 64 cost 24."""
    b = {"x.lora_B.default.weight": torch.randn(384, 8, generator=torch.Generator()
                                                .manual_seed(2))}
    payload = Codec(density=1 / 16, bits=4).encode(b)
    pieces, meta = _pieces_and_meta(payload)
    assert pieces["codes"].numel() == 192 * 4 // 8
    assert pieces["scale"].numel() == pieces["offset"].numel() == 3
    assert meta["codec"][0][6:] == [192, 4, 64]  # count, bits, block
    (out, sent), grids = decode_with_presence(payload), _grids(payload)
    name = "x.lora_B.default.weight"
    _assert_within_half_a_step(b[name], out[name], sent[name], *grids[name], 4)


def test_messages_without_a_block_field_decode_per_row():
    """Headers written before blocks existed (eight fields) mean per-row grids."""
    payload = Codec(bits=4).encode(_tensors(2))

    def drop_block(pieces, meta):
        return pieces, {**meta, "codec": [e[:8] for e in meta["codec"]]}

    old = decode(_tamper(payload, drop_block))
    assert all(torch.equal(old[n], t) for n, t in decode(payload).items())


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("bf16", 8e-3)])
def test_casting_rounds_to_the_wire_dtype(dtype, tol):
    t = _tensors()
    out = decode(Codec(dtype=dtype).encode(t))
    for n in t:
        assert out[n].dtype == torch.float32
        assert torch.allclose(out[n], t[n], rtol=tol, atol=1e-6)


def test_delta_coding_is_relative_to_the_reference():
    t = _tensors()
    ref = {n: v + 0.5 for n, v in t.items()}
    codec = Codec(density=0.1, delta=True)
    out = decode(codec.encode(t, ref), ref)
    for n in t:
        untouched = out[n] == ref[n]
        if t[n].dim() == 2:  # (the 3-entry bias may be kept whole)
            assert untouched.float().mean() > 0.5  # dropped entries keep the reference
        assert torch.allclose(out[n][~untouched], t[n][~untouched], atol=1e-6)
    with pytest.raises(wire.MessageError, match="no reference"):
        decode(codec.encode(t, ref))


def test_byte_count_is_the_payload_length_and_indices_pick_the_smaller_encoding():
    t = _tensors()
    for density, kind in ((0.9, BITMAP), (0.01, VARINT)):
        payload = Codec(density=density).encode(t)
        header = int.from_bytes(payload[:8], "little")
        assert len(payload) == 8 + header + sum(p.numel() * p.element_size()
                                                for p in wire.decode(payload).values())
        meta = _pieces_and_meta(payload)[1]
        # [name, shape, dtype, delta, index kind, bytes, count, bits, block]
        entry = next(e for e in meta["codec"] if e[0] == "m.q.lora_A.default.weight")
        assert entry[4] == kind
        if kind == BITMAP:
            assert entry[5] == math.ceil(4 * 48 / 8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_index_encodings_round_trip(numel, data):
    positions = np.array(sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=200))),
                         dtype=np.int64)
    kind, buf = encode_indices(positions, numel)
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    from sfedlora.core.codecs.indices import decode_indices

    assert np.array_equal(decode_indices(kind, buf, numel), positions)
    assert np.array_equal(varint_decode(varint_encode(positions), numel), positions)
    assert buf.size <= math.ceil(numel / 8)


def test_varint_is_one_byte_below_128_and_rejects_garbage():
    assert varint_encode(np.array([0, 127, 254])).tolist() == [0, 127, 127]
    assert varint_encode(np.array([128])).tolist() == [0x80, 0x01]
    with pytest.raises(IndexError_):
        varint_decode(np.array([0x80], dtype=np.uint8), 10)  # cut mid-number
    with pytest.raises(IndexError_):
        varint_decode(np.array([5, 0], dtype=np.uint8), 10)  # repeated position
    with pytest.raises(IndexError_):
        varint_decode(np.array([20], dtype=np.uint8), 10)  # past the end


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_round_trips(bits):
    q = np.random.default_rng(0).integers(0, 2**bits, size=37).astype(np.uint8)
    packed = pack_bits(q, bits)
    assert packed.size == math.ceil(37 * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, 37), q)


def test_error_feedback_carries_what_was_lost_into_the_next_message():
    codec = Codec(density=0.1, delta=True, error_feedback=True)
    ref = {n: torch.zeros_like(v) for n, v in _tensors().items()}
    residual, sent_sum = None, {n: torch.zeros_like(v) for n, v in ref.items()}
    target_sum = {n: torch.zeros_like(v) for n, v in ref.items()}
    for step in range(5):
        x = _tensors(step)
        payload, new_residual = codec.send(x, ref, residual)
        received = decode(payload, ref)
        for n in x:
            target = x[n] + (residual[n] if residual else 0)
            assert torch.allclose(new_residual[n], target - received[n])
            sent_sum[n] += received[n]
            target_sum[n] += x[n]
        residual = new_residual
    # telescoping: everything ever meant to be sent = what arrived + what is still owed
    for n in ref:
        assert torch.allclose(sent_sum[n] + residual[n], target_sum[n], atol=1e-5)


def test_error_feedback_keeps_residuals_of_tensors_not_sent_this_round():
    """RoLoRA alternates B and A: what B's message lost in round 1 must still be owed
    (and added) when B is sent again in round 3."""
    codec = Codec(density=0.1, delta=True, error_feedback=True)
    full = _tensors()
    a, b = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
    ref = {n: torch.zeros_like(v) for n, v in full.items()}
    _, residual = codec.send({b: full[b]}, ref, None)  # round 1: B goes up
    owed_b = residual[b].clone()
    assert owed_b.abs().sum() > 0
    _, residual = codec.send({a: full[a]}, ref, residual)  # round 2: A goes up
    assert torch.equal(residual[b], owed_b)  # B's residual survives A's round
    payload, residual = codec.send({b: full[b]}, ref, residual)  # round 3: B again
    received = decode(payload, ref)
    torch.testing.assert_close(received[b] + residual[b], full[b] + owed_b)


SPEC = {n: TensorSpec(tuple(v.shape), v.dtype) for n, v in _tensors().items()}


def _tamper(payload: bytes, edit) -> bytes:
    pieces, meta = _pieces_and_meta(payload)
    pieces, meta = edit(pieces, meta)
    return pack(pieces, meta.pop("codec"), meta)


A = "m.q.lora_A.default.weight"


def _with_entry(meta, tensor, **changes):
    fields = ["name", "shape", "dtype", "delta", "index", "index_bytes", "count", "bits",
              "block"]
    layout = [list(e) for e in meta["codec"]]
    i = [e[0] for e in layout].index(tensor)
    for key, value in changes.items():
        layout[i][fields.index(key)] = value
    return {**meta, "codec": layout}


def test_layout_and_index_travel_deflated_and_older_json_layouts_still_decode():
    """The layout (names, shapes, settings) is a deflated piece, not JSON metadata, and
    the index piece is deflated: with long module names the packed message is smaller
    than the one it replaces, and a message written the old way decodes the same."""
    t = {f"base_model.model.encoder.layer.{i}.attention.self.query.lora_{ab}.default."
         "weight": torch.randn(8, 96, generator=torch.Generator().manual_seed(i))
         for i in range(6) for ab in "AB"}
    payload = Codec(density=1 / 32, bits=4).encode(t)
    assert wire.read_meta(payload) == {"codec": "deflate"}
    assert set(wire.decode(payload)) == {"codes", "index", "scale", "offset", "layout"}
    pieces, meta = unpack(payload)
    assert [e[0] for e in meta["codec"]] == list(t)
    old = wire.encode(pieces, {"codec": meta["codec"]})  # the layout as JSON metadata
    assert len(payload) < len(old)
    new_out, old_out = decode(payload), decode(old)
    assert all(torch.equal(new_out[n], old_out[n]) for n in t)


def test_a_message_whose_quantised_tensors_keep_nothing_decodes():
    """Top-k over the whole message may keep only a 1-D tensor's entries: the codes
    piece is then empty, left out, and the quantised tensors decode as zeros."""
    t = {"x.lora_A.default.weight": torch.full((4, 8), 0.01), "x.bias": torch.tensor([5.0])}
    payload = Codec(density=1 / 33, bits=4).encode(t)
    assert "codes" not in wire.decode(payload)
    out = decode(payload)
    assert torch.equal(out["x.bias"], t["x.bias"])
    assert torch.equal(out["x.lora_A.default.weight"], torch.zeros(4, 8))


@pytest.mark.parametrize("piece,data,match", [
    ("layout", b"not deflate", "not deflate data"),
    ("layout", zlib.compress(b"[" * 300_000), "inflates past"),
    ("layout", zlib.compress(b"[" * 100_000), "not JSON"),  # nested past recursion
    ("layout", zlib.compress(b"[1]")[:-3], "truncated"),
    ("layout", zlib.compress(b"{]"), "not JSON"),
    ("index", zlib.compress(bytes(10_000)), "inflates past"),
    ("index", zlib.compress(b"x") + b"tail", "padded"),
])
def test_deflated_pieces_that_lie_are_refused(piece, data, match, monkeypatch):
    monkeypatch.setattr("sfedlora.core.codecs.codec.MAX_LAYOUT_BYTES", 200_000)
    raw = wire.decode(Codec(density=0.5, bits=4).encode(_tensors()))
    raw[piece] = torch.tensor(list(data), dtype=torch.uint8)
    with pytest.raises(wire.MessageError, match=match):
        decode(wire.encode(raw, {"codec": "deflate"}), spec=SPEC)
    del raw["layout"]
    with pytest.raises(wire.MessageError, match="needs its 'layout' piece"):
        decode(wire.encode(raw, {"codec": "deflate"}), spec=SPEC)


@pytest.mark.parametrize("edit,match", [
    (lambda p, m: (p, _with_entry(m, A, shape=[4000, 48000])), "declared"),
    (lambda p, m: (p, _with_entry(m, A, name="not.known")), "unexpected tensor"),
    (lambda p, m: (p, _with_entry(m, A, count=3)), "values declared"),
    (lambda p, m: (p, _with_entry(m, A, bits=3)), "not a valid quantisation"),
    (lambda p, m: (p, _with_entry(m, A, block=7)), "quantisation block"),
    (lambda p, m: (p, _with_entry(m, A, index="zip")), "malformed"),
    (lambda p, m: (p, _with_entry(m, A, index_bytes=10**9)), "index bytes its shape"),
    (lambda p, m: ({k: v for k, v in p.items() if k != "index"}, m), "too short"),
    (lambda p, m: ({**p, "codes": p["codes"][:-1]}, m), "too short"),
    (lambda p, m: ({**p, "values": torch.cat([p["values"], torch.zeros(1)])}, m),
     "no tensor describes"),
    (lambda p, m: ({**p, "evil": torch.zeros(3)}, m), "pieces are"),
    (lambda p, m: (p, {**m, "codec": {"a": 1}}), "codec header"),
])
def test_malformed_messages_are_refused_before_use(edit, match):
    payload = Codec(density=0.5, bits=4).encode(_tensors())
    with pytest.raises(wire.MessageError, match=match):
        decode(_tamper(payload, edit), spec=SPEC)


def test_codec_settings_are_checked():
    with pytest.raises(ValueError, match="density"):
        Codec(density=0.0)
    with pytest.raises(ValueError, match="bits"):
        Codec(bits=3)
    with pytest.raises(ValueError, match="set bits or dtype"):
        Codec(bits=8, dtype="fp16")


def test_metadata_nested_past_the_recursion_limit_is_a_message_error():
    from safetensors.torch import save

    payload = save({"x": torch.zeros(1)}, metadata={"sfedlora": "[" * 100_000})
    with pytest.raises(wire.MessageError, match="not valid JSON"):
        decode(payload)


def test_a_message_does_not_depend_on_the_order_of_its_tensors():
    """Deflated pieces depend on byte order, so tensors go in by name: two runtimes that
    build the same state in different orders send the same bytes."""
    t = _tensors(3)
    codec = Codec(density=0.3, bits=4)
    assert codec.encode(dict(reversed(t.items()))) == codec.encode(t)
