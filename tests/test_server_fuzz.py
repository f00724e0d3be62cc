"""The server survives any mix of malformed and honest updates (property-based)."""

from __future__ import annotations

import logging

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfedlora.core import wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.methods import get_method, part_of
from sfedlora.runtime.server import Reply, build_server

SPEC = {
    "m.l0.q.lora_A.default.weight": TensorSpec((4, 6), torch.float32),
    "m.l0.q.lora_B.default.weight": TensorSpec((6, 4), torch.float32),
    "m.classifier.modules_to_save.default.weight": TensorSpec((3, 6), torch.float32),
}
NAMES = sorted(SPEC)


def names_for(parts):
    return [n for n in NAMES if part_of(n) in set(parts)]


def honest(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.randn(s.shape, generator=gen) for n, s in SPEC.items()}


def malformed(kind: str, gen: torch.Generator) -> tuple[bytes, int]:
    t = honest(gen)
    name = NAMES[int(torch.randint(len(NAMES), (1,), generator=gen))]
    n = 10
    if kind == "missing":
        del t[name]
    elif kind == "extra":
        t["m.l0.k.lora_A.default.weight"] = torch.zeros(4, 6)
    elif kind == "shape":
        t[name] = torch.zeros(SPEC[name].shape[0] + 1, SPEC[name].shape[1])
    elif kind == "transposed":
        t[name] = t[name].T.contiguous()
    elif kind in ("float64", "float16", "bfloat16", "int64"):
        t[name] = t[name].to(getattr(torch, kind))
    elif kind in ("nan", "inf", "-inf"):
        flat = t[name].view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = float(kind)
    elif kind == "huge":
        t[name] = torch.zeros(1024, 1024)
    elif kind == "empty":
        return b"", n
    elif kind == "truncated":
        payload = wire.encode(t)
        return payload[: int(torch.randint(1, len(payload) - 1, (1,), generator=gen))], n
    elif kind == "garbage_header":
        payload = bytearray(wire.encode(t))
        payload[8:20] = b"\xff" * 12
        return bytes(payload), n
    elif kind == "random_bytes":
        return bytes(torch.randint(0, 256, (200,), generator=gen, dtype=torch.uint8)), n
    elif kind == "zero_examples":
        return wire.encode(t), 0
    elif kind == "negative_examples":
        return wire.encode(t), -5
    return wire.encode(t), n


KINDS = ["missing", "extra", "shape", "transposed", "float64", "float16", "bfloat16", "int64",
         "nan", "inf", "-inf", "huge", "empty", "truncated", "garbage_header", "random_bytes",
         "zero_examples", "negative_examples"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


BAD_SENT = []


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=7, max_size=12),
    num_honest=st.integers(0, 4),
    aggregation=st.sampled_from(["mean", "median", "trimmed_mean"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_server_never_crashes_and_logs_every_bad_update(kinds, num_honest, aggregation, seed):
    from sfedlora.config import ServerConfig

    gen = torch.Generator().manual_seed(seed)
    method = get_method("fedit")
    state = {n: torch.zeros(s.shape) for n, s in SPEC.items()}
    server = build_server(method, state, SPEC, names_for, ServerConfig(aggregation=aggregation),
                          min_clients=1)
    replies, bad_ids = [], set()
    cid = 0
    for _ in range(num_honest):
        replies.append(Reply(cid, 10, wire.encode(honest(gen))))
        cid += 1
    for kind in kinds:
        payload, n = malformed(kind, gen)
        replies.append(Reply(cid, n, payload))
        bad_ids.add(cid)
        cid += 1
    order = torch.randperm(len(replies), generator=gen).tolist()
    records = _Records()
    logging.getLogger("sfedlora.runtime.server").addHandler(records)
    try:
        report = server.aggregate(1, [replies[i] for i in order])
    finally:
        logging.getLogger("sfedlora.runtime.server").removeHandler(records)

    BAD_SENT.extend(kinds)
    assert set(report.rejected) == bad_ids
    assert set(report.accepted) == set(range(num_honest))
    assert all(reason for reason in report.rejected.values())
    for bad in bad_ids:
        assert any(f"rejected update of client {bad}:" in m for m in records.messages)
    assert report.applied == (num_honest >= 1)
    assert all(torch.isfinite(t).all() for t in server.state.values())
    if not report.applied:
        assert all(torch.equal(server.state[n], state[n]) for n in NAMES)


def test_the_fuzz_sent_at_least_a_thousand_malformed_updates():
    # runs after the property test in file order; guards the size of the campaign
    if not BAD_SENT:
        test_server_never_crashes_and_logs_every_bad_update()
    assert len(BAD_SENT) >= 1000, len(BAD_SENT)
    assert set(BAD_SENT) == set(KINDS)


def test_rejected_round_leaves_state_unchanged_below_min_clients():
    from sfedlora.config import ServerConfig

    state = {n: torch.ones(s.shape) for n, s in SPEC.items()}
    server = build_server(get_method("fedit"), dict(state), SPEC, names_for, ServerConfig(),
                          min_clients=2)
    gen = torch.Generator().manual_seed(0)
    report = server.aggregate(1, [Reply(0, 5, wire.encode(honest(gen))),
                                  Reply(1, 5, b"junk")])
    assert not report.applied and report.accepted == [0]
    assert all(torch.equal(server.state[n], state[n]) for n in NAMES)


def test_norm_limit_rejects_outsized_updates():
    from sfedlora.config import ServerConfig

    state = {n: torch.zeros(s.shape) for n, s in SPEC.items()}
    server = build_server(get_method("fedit"), state, SPEC, names_for,
                          ServerConfig(max_update_norm=50.0))
    gen = torch.Generator().manual_seed(1)
    big = {n: 100 * t for n, t in honest(gen).items()}
    report = server.aggregate(1, [Reply(0, 5, wire.encode(honest(gen))),
                                  Reply(1, 5, wire.encode(big))])
    assert report.accepted == [0] and "exceeds server.max_update_norm=50.0" in report.rejected[1]
