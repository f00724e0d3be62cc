"""Robust combiners contain a scaled attack; DP noise is accounted exactly."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from sfedlora import wire
from sfedlora.adapters import TensorSpec
from sfedlora.aggregation import clip_update, coordinate_median, trimmed_mean, update_norm
from sfedlora.config import PrivacyConfig, ServerConfig
from sfedlora.methods import get_method
from sfedlora.privacy import GaussianMechanism
from sfedlora.server import Reply, Server
from sfedlora.simulation import Simulation

A = "m.l0.q.lora_A.default.weight"
SPEC = {A: TensorSpec((4, 8), torch.float32)}


def _server(aggregation: str, **kw) -> Server:
    return Server(get_method("fedsa"), {A: torch.zeros(4, 8)}, SPEC, lambda parts: [A],
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
    assert torch.allclose(clipped[A] - ref[A], torch.full((4, 8), 2.0 / (32**0.5)))


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 0.5, 10), (0.7, 0.1, 100),
                                                     (2.0, 1.0, 3)])
def test_epsilon_matches_the_accountant(sigma, q, rounds):
    mech = GaussianMechanism(PrivacyConfig(enabled=True, noise_multiplier=sigma, delta=1e-5),
                             sample_rate=q, seed=0)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert mech.epsilon(rounds) == pytest.approx(expected, rel=1e-12)


def test_dp_noise_has_the_right_scale_and_is_seeded():
    cfg = PrivacyConfig(enabled=True, noise_multiplier=2.0, clip_norm=0.5)
    mech = GaussianMechanism(cfg, sample_rate=1.0, seed=3)
    zeros = {A: torch.zeros(200, 200)}
    noisy = mech.noise(zeros, num_updates=4, round_idx=1)[A]
    assert noisy.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert torch.equal(noisy, mech.noise(zeros, 4, 1)[A])
    assert not torch.equal(noisy, mech.noise(zeros, 4, 2)[A])


def test_dp_run_reports_epsilon_per_round_and_still_learns(tiny_config, tmp_path):
    cfg = tiny_config("method=fedit", "clients.num=8", "rounds=5", "local.steps=10",
                      "local.lr=0.1", "lora.alpha=8", "privacy.enabled=true",
                      "privacy.noise_multiplier=0.3", "privacy.clip_norm=5.0",
                      "data.min_partition_size=2")
    summary = Simulation(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    mech = GaussianMechanism(cfg.privacy, sample_rate=1.0, seed=0)
    assert [x["dp_epsilon"] for x in lines] == [mech.epsilon(r) for r in range(1, 6)]
    assert lines[0]["dp_epsilon"] < lines[-1]["dp_epsilon"]
    assert summary["train_loss"] < 0.9 * lines[0]["train_loss"]


def test_privacy_needs_a_shared_a_init(tiny_config):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"set lora\.a_init=shared"):
        tiny_config("method=sfed", "privacy.enabled=true")
    with pytest.raises(ConfigError, match=r"set server\.aggregation=mean"):
        tiny_config("method=fedit", "privacy.enabled=true", "server.aggregation=median")
