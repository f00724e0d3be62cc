"""Robust combiners contain a scaled attack; DP noise is accounted exactly."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from sfedlora.aggregation.combiners import clip_update, coordinate_median, trimmed_mean, update_norm
from sfedlora.config import PrivacyConfig, ServerConfig
from sfedlora.core import codecs, wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.methods import Part, get_method
from sfedlora.privacy.dp import Accountant, GaussianMechanism
from sfedlora.runtime.server import Reply, Server, build_server
from sfedlora.runtime.simulation import Simulation
from tests.conftest import assert_learns

A = "m.l0.q.lora_A.default.weight"
SPEC = {A: TensorSpec((4, 8), torch.float32)}


def _server(aggregation: str, **kw) -> Server:
    return build_server(get_method("fedsa"), {A: torch.zeros(4, 8)}, SPEC, lambda parts: [A],
                        ServerConfig(aggregation=aggregation, **kw))


def _round_with_attacker(server: Server, scale: float = 1000.0):
    gen = torch.Generator().manual_seed(0)
    honest = [torch.randn(4, 8, generator=gen) * 0.1 for _ in range(6)]
    attack = honest[0] * scale
    replies = [Reply(i, 10, wire.encode({A: t})) for i, t in enumerate([*honest, attack])]
    server.aggregate(1, replies)
    stack = torch.stack(honest)
    return server.state[A], stack.min(0).values, stack.max(0).values


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_robust_combiners_stay_within_the_honest_range(aggregation):
    kw = {"trim_fraction": 0.2} if aggregation == "trimmed_mean" else {}
    result, low, high = _round_with_attacker(_server(aggregation, **kw))
    assert ((result >= low) & (result <= high)).all()


def test_the_plain_mean_is_dragged_out_of_range_by_the_attacker():
    result, low, high = _round_with_attacker(_server("mean"))
    assert not ((result >= low) & (result <= high)).all()


def test_norm_clipping_bounds_the_attackers_pull():
    result, _, _ = _round_with_attacker(_server("mean", clip_norm=1.0))
    assert result.norm() <= 1.0 + 1e-6  # mean of changes each of norm <= 1


def test_combiner_formulas():
    ts = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -1.0]), torch.tensor([3.0, 0.0]),
          torch.tensor([100.0, 5.0])]
    assert torch.equal(coordinate_median(ts, [0.25] * 4), torch.tensor([2.5, 2.5]))
    assert torch.equal(trimmed_mean(0.25)(ts, [0.25] * 4), torch.tensor([2.5, 2.5]))
    assert torch.equal(coordinate_median(ts[:3], [1 / 3] * 3), torch.tensor([2.0, 0.0]))


def test_clip_update_scales_the_change_not_the_tensor():
    ref = {A: torch.ones(4, 8)}
    new = {A: torch.ones(4, 8) + 3.0}
    clipped = clip_update(new, ref, max_norm=2.0)
    assert update_norm(clipped, ref) == pytest.approx(2.0, rel=1e-6)
    # the same norm measured without update_norm
    assert torch.linalg.vector_norm(clipped[A] - ref[A]).item() == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped[A] - ref[A], torch.full((4, 8), 2.0 / (32**0.5)))


def test_dp_noise_has_the_right_scale_and_comes_from_os_entropy(monkeypatch):
    cfg = PrivacyConfig(enabled=True, noise_multiplier=2.0, clip_norm=0.5)
    mech = GaussianMechanism(cfg, sample_rate=1.0, expected_clients=4)
    zeros = {A: torch.zeros(200, 200)}
    noisy = mech.release(zeros, zeros)[A]
    assert noisy.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert abs(noisy.mean().item()) < 0.01  # 40,000 draws of std 0.25: 5 sigma is 0.006
    assert not torch.equal(noisy, mech.release(zeros, zeros)[A])  # never the same twice
    # the only source is os.urandom: with its bytes fixed, the noise is fixed
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256))
    assert torch.equal(mech.release(zeros, zeros)[A], mech.release(zeros, zeros)[A])


def test_dp_noise_cannot_be_regenerated_from_the_config_seed(tiny_config):
    """Two runs of one DP config release different states, and the noise is not the
    seeded draw an attacker who read config.yaml would subtract."""
    from sfedlora.core.seeds import derive_seed

    cfg = tiny_config("method=fedit", "privacy.enabled=true", "privacy.noise_multiplier=1.0")
    released = []
    for _ in range(2):
        sim = Simulation(cfg)
        sim.run_round(1)
        released.append(sim.server.state[next(iter(sim.server.state))])
    assert not torch.equal(released[0], released[1])
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 404, 1))
    seeded = torch.randn(released[0].shape, generator=gen)
    diff = released[0] - released[1]  # = noise_0 - noise_1: the clipped means cancel
    assert not torch.allclose(diff, torch.zeros_like(diff), atol=1e-3)
    std = cfg.privacy.noise_multiplier * cfg.privacy.clip_norm / cfg.clients_per_round
    assert (diff - std * seeded).abs().max() > 1e-3


def test_dp_accounts_the_sampling_rate_of_partial_participation(tiny_config, tmp_path):
    """2 of 8 clients per round: the accountant must use q = 0.25 (it spends far less
    than q = 1, which the earlier tests would not have noticed)."""
    cfg = tiny_config("method=fedit", "clients.num=8", "clients.per_round=2", "rounds=2",
                      "privacy.enabled=true", "privacy.noise_multiplier=1.1",
                      "data.min_partition_size=2")
    Simulation(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    orders = RDPAccountant.DEFAULT_ALPHAS
    for line in lines:  # RDP against Opacus, written independently of dp-accounting
        rdp = compute_rdp(q=0.25, noise_multiplier=1.1, steps=line["round"], orders=orders)
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=cfg.privacy.delta)
        assert line["dp_epsilon_rdp"] == pytest.approx(expected, rel=2e-3)
        assert line["dp_epsilon"] <= line["dp_epsilon_rdp"]  # PLD is the tighter
    full = Accountant(1.1, 1.0, cfg.privacy.delta).epsilon_pld(2)
    assert lines[-1]["dp_epsilon"] < 0.6 * full  # 2.83 against 5.87 at q = 1


@pytest.mark.slow
def test_dp_run_reports_epsilon_per_round_and_still_learns(encoder_config, tmp_path):
    # noise small enough to learn in 5 rounds (std 0.0025 per coordinate of the mean)
    cfg = encoder_config("method=fedit", "clients.num=8", "privacy.enabled=true",
                         "privacy.noise_multiplier=0.01", "privacy.clip_norm=2.0",
                         "data.min_partition_size=2", "eval.every=1")
    Simulation(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    acc = Accountant(cfg.privacy.noise_multiplier, 1.0, cfg.privacy.delta)
    assert [x["dp_epsilon"] for x in lines[1:]] == [acc.epsilon_pld(r) for r in range(1, 6)]
    assert lines[1]["dp_epsilon"] < lines[-1]["dp_epsilon"]
    assert_learns(cfg, tmp_path / "run")


def test_privacy_needs_a_shared_a_init(tiny_config):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"set lora\.a_init=shared"):
        tiny_config("method=sfed", "privacy.enabled=true")
    with pytest.raises(ConfigError, match=r"set server\.aggregation=mean"):
        tiny_config("method=fedit", "privacy.enabled=true", "server.aggregation=median")


def _own_draw_norm(sim, cid: int, round_idx: int, names) -> float:
    own = sim.pool.exp.worker.drawn_start(cid, round_idx)
    return float(sum(own[n].double().pow(2).sum() for n in names)) ** 0.5


def test_flora_clipping_measures_the_change_from_the_clients_own_fresh_draw(tiny_config):
    """FLoRA's A is drawn fresh each round and never sent: a clip bound well above the
    honest change (but below ||A||) must leave the merged factors untouched; counting A
    from zero clipped them to 13-20% before, shrinking the merged product ~40x."""
    args = ("method=flora", "lora.client_ranks=[2,4]", "local.lr=0.001", "rounds=2")
    plain = Simulation(tiny_config(*args))
    plain.run_round(1)
    a_names = plain.pool.exp.worker.slots.names({Part.A})
    smallest = min(_own_draw_norm(plain, c, 1, a_names) for c in range(4))
    clipped = Simulation(tiny_config(*args, f"server.clip_norm={smallest / 2}"))
    clipped.run_round(1)
    assert set(clipped.server.stage.merges[1]) == set(plain.server.stage.merges[1])
    for name, t in plain.server.stage.merges[1].items():
        assert torch.equal(clipped.server.stage.merges[1][name], t)


def test_clipping_a_fresh_draw_bounds_its_change_not_its_value(tiny_config):
    sim = Simulation(tiny_config("method=flora", "server.clip_norm=1e-3"))
    seen = []
    real = clip_update
    import sfedlora.runtime.server as server_module

    def spy(tensors, reference, max_norm):
        out = real(tensors, reference, max_norm)
        seen.append((update_norm(out, reference), {n: reference[n] for n in tensors}))
        return out

    server_module.clip_update = spy
    try:
        sim.run_round(1)
    finally:
        server_module.clip_update = real
    assert len(seen) == 4
    for norm, reference in seen:
        assert norm == pytest.approx(1e-3, rel=1e-3)  # float32 values ~0.1, changes ~1e-5
        a = [t for n, t in reference.items() if ".lora_A." in n]
        assert a and all(t.abs().sum() > 0 for t in a)  # measured from the own draw


def test_norm_bound_accepts_an_honest_first_round_with_independent_a(tiny_config):
    """sfed's default a_init=independent: the first round's A was never sent, so a norm
    bound must measure it against each client's own draw (before: from zero, so every
    honest client was rejected)."""
    probe = Simulation(tiny_config("method=sfed", "local.lr=0.001"))
    a_names = probe.pool.exp.worker.slots.names({Part.A})
    bound = min(_own_draw_norm(probe, c, 1, a_names) for c in range(4)) / 2
    sim = Simulation(tiny_config("method=sfed", "local.lr=0.001",
                                 f"server.max_update_norm={bound}"))
    rec = sim.run_round(1).metrics
    assert rec["rejected"] == {} and rec["aggregated"]
    assert sorted(rec["clients"]) == [0, 1, 2, 3]


def test_a_change_without_a_reference_is_an_error_not_a_change_from_zero():
    with pytest.raises(KeyError, match="no reference value"):
        update_norm({A: torch.ones(4, 8)}, {})


def _sparse_round(aggregation: str, clients: int = 7, density: float = 0.25):
    """A server holding A; each client sends the top-k of its change (delta-coded)."""
    from sfedlora.core.codecs import Codec

    spec = {A: TensorSpec((16, 32), torch.float32)}
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(16, 32, generator=gen)
    server = build_server(get_method("fedsa"), {A: start.clone()}, spec, lambda parts: [A],
                          ServerConfig(aggregation=aggregation))
    codec = Codec(density=density, delta=True)
    news = [start + torch.randn(16, 32, generator=gen) for _ in range(clients)]
    replies = [Reply(i, 10, codec.encode({A: t}, {A: start})) for i, t in enumerate(news)]
    sent = [(codecs.decode(r.payload, {A: start})[A] != start) for r in replies]
    server.aggregate(1, replies)
    return server.state[A], start, news, torch.stack(sent)


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_robust_combiners_use_only_the_clients_that_sent_a_coordinate(aggregation):
    """25% top-k deltas from 7 clients: the median moved 4.3% of the coordinates the
    mean moves (trimmed mean 47.5%) when unsent coordinates counted as 'no change'."""
    result, start, news, sent = _sparse_round(aggregation)
    mean_result, *_ = _sparse_round("mean")
    moved, mean_moved = result != start, mean_result != start
    assert torch.equal(moved, mean_moved)  # every coordinate somebody sent moves
    assert torch.equal(moved, sent.any(0))
    values = torch.stack(news).double()
    combine = coordinate_median if aggregation == "median" else trimmed_mean(0.1)
    for i, j in [tuple(x) for x in sent.any(0).nonzero()[:50].tolist()]:
        senders = [values[c, i, j] for c in range(len(news)) if sent[c, i, j]]
        expected = combine([s.reshape(1) for s in senders], [1.0] * len(senders))
        torch.testing.assert_close(result[i, j].double(), expected[0], rtol=0, atol=1e-6)


def test_median_over_mixed_ranks_combines_each_component_over_its_holders():
    """HetLoRA, most clients at rank 2 of 4: the median zeroed every row of A beyond
    rank 2 each round; it must be the median over the clients that hold the row."""
    b = A.replace("lora_A", "lora_B")
    spec = {A: TensorSpec((4, 8), torch.float32), b: TensorSpec((6, 4), torch.float32)}
    ranks = [2, 2, 2, 2, 4, 4, 4]
    server = build_server(get_method("hetlora"), {A: torch.zeros(4, 8), b: torch.zeros(6, 4)},
                          spec, lambda parts: [A, b], ServerConfig(aggregation="median"),
                          ranks=ranks)
    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(4, 8, generator=gen) for _ in ranks]
    bs = [torch.randn(6, 4, generator=gen) for _ in ranks]
    replies = [Reply(c, 10, wire.encode({A: t[:r], b: u[:, :r]}))
               for c, (t, u, r) in enumerate(zip(full, bs, ranks, strict=True))]
    report = server.aggregate(1, replies)
    assert report.accepted == list(range(7))
    new = server.state[A]
    torch.testing.assert_close(new[:2], torch.stack(full).median(0).values[:2], rtol=0, atol=0)
    torch.testing.assert_close(new[2:], torch.stack(full[4:]).median(0).values[2:],
                               rtol=0, atol=0)
    torch.testing.assert_close(server.state[b][:, 2:],
                               torch.stack(bs[4:]).median(0).values[:, 2:], rtol=0, atol=0)


def test_combiners_without_masks_keep_their_formulas():
    ts = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -1.0]), torch.tensor([3.0, 0.0])]
    masks = [torch.tensor([True, False]), torch.tensor([True, True]),
             torch.tensor([False, True])]
    assert torch.equal(coordinate_median(ts, [1 / 3] * 3, masks), torch.tensor([1.5, -0.5]))
    assert torch.equal(trimmed_mean(0.5)(ts, [1 / 3] * 3, masks), torch.tensor([1.5, -0.5]))
    none_sent = [torch.tensor([False, True])] * 3
    assert torch.equal(coordinate_median(ts, [1 / 3] * 3, none_sent), torch.tensor([2.0, 0.0]))
