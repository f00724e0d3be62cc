"""Sparse, delta-coded downloads (issue 18): server and clients agree bit for bit on
what each client holds, through partial participation, absences and refreshes."""

from __future__ import annotations

import pytest
import torch

from sfedlora.comm.downlink import REFRESH, Downlink, receive
from sfedlora.core import wire
from sfedlora.core.codecs import Codec
from sfedlora.core.wire import MessageError, read_meta


def _states(seed: int, rounds: int) -> list[dict[str, torch.Tensor]]:
    """A drifting global state, as aggregation would produce."""
    gen = torch.Generator().manual_seed(seed)
    state = {"a": torch.randn(16, 256, generator=gen),
             "b": torch.randn(256, 16, generator=gen), "head": torch.randn(3, generator=gen)}
    out = []
    for _ in range(rounds):
        state = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
        out.append(state)
    return out


def _assert_same_bits(held: dict, published: dict) -> None:
    assert held.keys() == published.keys()
    for name in published:
        assert torch.equal(held[name], published[name]), name


@pytest.mark.parametrize("codec", [Codec(density=0.1, bits=8, delta=True),
                                   Codec(density=0.25, delta=True),
                                   Codec(bits=4, delta=True)])
def test_clients_hold_the_servers_bits_through_absences_and_refreshes(codec):
    start = _states(0, 1)[0]
    server = Downlink(codec, history=3, state=start)
    held: dict[int, dict | None] = dict.fromkeys(range(5))
    # who downloads each round: client 4 is away for rounds 2-7 (beyond the history),
    # client 3 for rounds 3-5 (within it); client 2 drops out after downloading in 4
    schedule = [[0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 2], [1, 2], [0, 1, 2],
                [0, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3, 4], [4], [0, 1, 2, 3, 4]]
    kinds = set()
    for round_idx, (state, clients) in enumerate(zip(_states(1, 10), schedule, strict=True)):
        for cid in clients:
            message = server.message(cid, {"extra": torch.ones(2)})
            tensors, new = receive(message, held[cid], lambda: start)
            kinds.add("refresh" if read_meta(message)["from"] is None else "chain")
            assert torch.equal(tensors.pop("extra"), torch.ones(2))
            if round_idx == 4 and cid == 2:  # it never applied this download
                server.forget(cid)
                continue
            held[cid] = new
            assert new["version"] == server.version
            _assert_same_bits(new["tensors"], server.published)
        server.publish(state)
    assert kinds == {"refresh", "chain"}


def test_a_chain_is_smaller_than_a_copy_and_a_stale_client_is_refused():
    start = _states(0, 1)[0]
    server = Downlink(Codec(density=0.05, bits=8, delta=True), history=4, state=start)
    dense = sum(t.numel() * 4 for t in start.values())
    _, held = receive(server.message(0, {}), None, lambda: start)  # version 0: drawn
    assert held["version"] == 0
    server.publish(_states(2, 1)[0])
    chain = server.message(0, {})
    assert len(chain) < dense / 5
    _, newer = receive(chain, held, lambda: start)
    server.publish(_states(3, 1)[0])
    with pytest.raises(MessageError, match="continues version 1 but this client holds "
                                           "version 0"):
        receive(server.message(0, {}), held, lambda: start)  # the state before the last
    assert newer["version"] == 1


def test_a_client_whose_seeded_start_differs_from_the_servers_is_refused():
    start = _states(0, 1)[0]
    server = Downlink(Codec(density=0.1, delta=True), history=4, state=start)
    server.publish(_states(5, 1)[0])
    other = {n: t + 1e-7 for n, t in start.items()}
    with pytest.raises(MessageError, match="seeded initial state differs"):
        receive(server.message(0, {}), None, lambda: other)


def test_the_ledger_survives_a_checkpoint(tmp_path):
    from sfedlora.core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    server = Downlink(Codec(density=0.2, bits=8, delta=True), history=3,
                      state=_states(0, 1)[0])
    start = _states(0, 1)[0]
    _, held = receive(server.message(0, {}), None, lambda: start)
    for state in _states(4, 2):
        server.publish(state)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(round=2, server={"downlink": server.state_dict()},
                                     pool={}, totals={}, config={}, metrics=[]))
    again = Downlink(Codec(density=0.2, bits=8, delta=True), history=3, state={})
    again.load_state_dict(load_checkpoint(path).server["downlink"])
    assert again.message(0, {}, advance=False) == server.message(0, {}, advance=False)
    _, caught_up = receive(again.message(0, {}), held, lambda: start)
    _assert_same_bits(caught_up["tensors"], server.published)


@pytest.fixture
def delta_run(tiny_config):
    """FedIT with top-k 10% 8-bit delta downloads, 2 of 4 clients per round."""
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config("method=fedit", "rounds=8", "clients.per_round=2",
                      "comm.down.delta=true", "comm.down.density=0.1", "comm.down.bits=8",
                      "comm.down_history=2")
    return Simulation(cfg)


def test_every_client_holds_the_published_state_bit_for_bit(delta_run):
    sim = delta_run
    dense = sum(t.numel() * 4 for t in sim.server.state.values())
    sizes = []
    for r in range(1, 9):
        before = {n: t.clone() for n, t in sim.server.downlink.published.items()}
        metrics = sim.run_round(r).metrics
        for cid in metrics["clients"]:  # what it trained from and uploads against
            held = sim.pool.states[cid].held
            assert held["version"] == r - 1
            _assert_same_bits(held["tensors"], before)
        sizes += metrics["bytes_down_per_client"].values()
    assert sim.server.downlink.version == 8
    assert min(sizes) < dense < max(sizes)  # chains smaller than a copy, and refreshes


def test_a_delta_download_run_resumes_bit_identically(tiny_config, tmp_path):
    from sfedlora.core.checkpoint import load_checkpoint, save_checkpoint
    from sfedlora.runtime.simulation import Simulation

    args = ("method=fedit", "rounds=6", "clients.per_round=2", "comm.down.delta=true",
            "comm.down.density=0.1", "comm.down.bits=8")
    whole = Simulation(tiny_config(*args))
    expected = [whole.run_round(r).metrics for r in range(1, 7)]
    first = Simulation(tiny_config(*args))
    for r in (1, 2, 3):
        first.run_round(r)
    save_checkpoint(tmp_path / "ckpt.safetensors", first.checkpoint(3, 0.0, []))
    second = Simulation(tiny_config(*args))
    second.restore(load_checkpoint(tmp_path / "ckpt.safetensors"))
    assert [second.run_round(r).metrics for r in (4, 5, 6)] == expected[3:]


@pytest.mark.parametrize(("overrides", "other"), [
    (("lora.client_ranks=[2,4]", "method=hetlora"), "lora.client_ranks"),
    (("privacy.secure_aggregation=true",), "privacy.secure_aggregation"),
    (("method=flasc",), "method=flasc"),
])
def test_delta_downloads_refuse_what_they_cannot_serve(tiny_config, overrides, other):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=rf"comm\.down\.delta does not work with {other}"):
        tiny_config("comm.down.delta=true", *overrides)


def test_aggregation_keeps_what_downloads_have_not_sent_yet(delta_run):
    """Clients train from the published P, which lags the global G; their changes are
    carried onto G (G + x - P, data-size weighted), so the lag is not dropped."""
    from sfedlora.core.codecs import decode

    sim = delta_run
    for r in (1, 2):
        sim.run_round(r)
    g = {n: t.clone() for n, t in sim.server.state.items()}
    p = {n: t.clone() for n, t in sim.server.downlink.published.items()}
    assert max(float((g[n] - p[n]).abs().max()) for n in p) > 1e-4  # a real lag
    replies, aggregate = [], sim.server.aggregate

    def spy(round_idx, got):
        replies.extend(got)
        return aggregate(round_idx, got)

    sim.server.aggregate = spy
    sim.run_round(3)
    total = sum(r.num_examples for r in replies)
    uploads = [(r.num_examples, decode(r.payload, reference=p)) for r in replies]
    for name in uploads[0][1]:
        expected = sum(w * (g[name] + x[name] - p[name]) for w, x in uploads) / total
        torch.testing.assert_close(sim.server.state[name], expected, rtol=1e-5, atol=1e-6)


def test_fedsa_a_is_sent_as_a_change_against_the_mean_of_the_clients_draws(tiny_config):
    """FedSA's A exists on the server only after the first aggregation. Version 0 holds
    the mean of the clients' own A draws as a pending reference: round 1 trains exactly
    as without delta downloads (each client from its own draw), the first A goes out as
    a change against that mean (far smaller than A itself), and later downloads are
    chains smaller than a copy, not a refresh every round."""
    from sfedlora.runtime.simulation import Simulation

    args = ("method=sfed", "rounds=4", "comm.down.density=0.1", "comm.down.bits=8")
    sim = Simulation(tiny_config(*args, "comm.down.delta=true"))
    downlink, inits = sim.server.downlink, sim.inits
    a_names = [n for n in inits.shared_init if ".lora_A." in n]
    assert downlink.pending == set(a_names) and not set(a_names) & set(sim.server.state)
    for name in a_names:  # the mean of the draws, exactly as its formula
        draws = [inits.client_init(c)[name] for c in range(sim.cfg.clients.num)]
        assert torch.equal(downlink.published[name], sum(draws[1:], draws[0].clone()) / 4)
    first_download = downlink.message(0, {}, advance=False)
    assert REFRESH not in wire.decode(first_download)  # version 0: nothing to send
    tensors, _ = receive(first_download, None, inits.downlink_origin)
    assert not set(a_names) & set(tensors)  # pending: not handed over

    plain = Simulation(tiny_config(*args))
    assert sim.run_round(1).metrics["train_loss"] == plain.run_round(1).metrics["train_loss"]
    assert downlink.version == 1 and not downlink.pending
    a_bytes = sum(sim.server.state[n].numel() * 4 for n in a_names)
    assert len(downlink.updates[-1][1]) < a_bytes / 2  # a sparse change, not A
    dense = downlink.dense_bytes
    assert dense == sum(t.numel() * 4 for t in sim.server.state.values()) > 0
    first = {n: t.clone() for n, t in downlink.published.items()}
    sim.run_round(2)
    for cid in range(4):  # what every client trained from in round 2
        _assert_same_bits(sim.pool.states[cid].held["tensors"], first)
    for r in (3, 4):
        sizes = sim.run_round(r).metrics["bytes_down_per_client"].values()
        assert max(sizes) < dense  # a chain; a refresh would be a copy plus a header
