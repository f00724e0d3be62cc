"""Client-level DP as one design (issue 37, items 1, 2 and 14): secret Poisson sampling,
a fixed-denominator release, and an accountant for exactly that. Every figure is
checked against a value computed without the code under test: norms with
``torch.linalg.vector_norm``, sums by hand, epsilons from Opacus (an independent
implementation of the same accountant)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from sfedlora.config import ConfigError, PrivacyConfig, ServerConfig
from sfedlora.core import wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.checkpoint import load_checkpoint
from sfedlora.core.records import PARTICIPATION_METRICS
from sfedlora.methods import get_method
from sfedlora.privacy.dp import Accountant, GaussianMechanism
from sfedlora.privacy.sampling import SecretPoissonSampler, sample_clients
from sfedlora.runtime.server import Reply, Server, build_server
from sfedlora.runtime.simulation import Simulation

A = "m.l0.q.lora_A.default.weight"
H = "m.classifier.weight"


def _server(sigma: float, clip: float, expected: float, shape=(4, 8)) -> Server:
    """FedIT on two tensors starting from zero, under DP with ``expected`` = q*N."""
    spec = {A: TensorSpec(shape, torch.float32), H: TensorSpec((3,), torch.float32)}
    state = {A: torch.zeros(shape), H: torch.zeros(3)}
    mech = GaussianMechanism(PrivacyConfig(enabled=True, noise_multiplier=sigma,
                                           clip_norm=clip), 0.5, expected)
    return build_server(get_method("fedit"), state, spec, lambda parts: [A, H], ServerConfig(),
                        privacy=mech)


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].double().reshape(-1) for n in sorted(tensors)])


def _uploads(count: int, scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{A: torch.randn(4, 8, generator=gen) * scale, H: torch.randn(3, generator=gen)
             * scale} for _ in range(count)]


def test_a_change_beyond_the_clip_norm_is_released_at_exactly_that_norm():
    """One client, noise off, q*N = 1: the release moves by exactly C (a DP that never
    clips releases the raw change, of norm about 30 here)."""
    server = _server(sigma=0.0, clip=0.25, expected=1.0)
    upload = _uploads(1, scale=5.0)[0]
    server.aggregate(1, [Reply(0, 10, wire.encode(upload))])
    moved = torch.linalg.vector_norm(_flat(server.state))
    assert torch.linalg.vector_norm(_flat(upload)) > 10
    assert moved.item() == pytest.approx(0.25, rel=1e-6)


def test_the_release_is_the_sum_of_clipped_changes_over_the_expected_cohort():
    """Three clients with very different data sizes and q*N = 4: the release is the sum
    of their (unclipped, small) changes divided by 4, never weighted by examples, never
    divided by the 3 that replied."""
    server = _server(sigma=0.0, clip=100.0, expected=4.0)
    uploads = _uploads(3, scale=0.1)
    server.aggregate(1, [Reply(c, n, wire.encode(u))
                         for c, (n, u) in enumerate(zip([1, 50, 400], uploads, strict=True))])
    for name in (A, H):
        by_hand = (uploads[0][name] + uploads[1][name] + uploads[2][name]) / 4
        assert torch.allclose(server.state[name], by_hand, atol=1e-7, rtol=0)


def test_a_round_nobody_took_part_in_still_releases_noise():
    server = _server(sigma=1.0, clip=1.0, expected=2.0)
    report = server.aggregate(1, [])
    assert report.applied
    assert (server.state[A] != 0).all()  # a skip would tell who took part: none did


def test_the_noise_on_the_release_has_sigma_c_over_the_expected_cohort():
    """Zero changes from 3 clients, sigma 2, C 0.5, q*N 4: each released coordinate is
    N(0, (2 * 0.5 / 4)^2). 40,000 coordinates estimate the std to 0.4%."""
    server = _server(sigma=2.0, clip=0.5, expected=4.0, shape=(200, 200))
    zero = {A: torch.zeros(200, 200), H: torch.zeros(3)}
    server.aggregate(1, [Reply(c, 5, wire.encode(zero)) for c in range(3)])
    assert server.state[A].double().std().item() == pytest.approx(0.25, rel=0.02)
    assert abs(server.state[A].double().mean().item()) < 0.01


def test_secure_sums_under_dp_get_noise_over_the_expected_cohort_not_over_one():
    """The secure path hands the server only the mean of the survivors' uploads; the
    noise on its release must still be sigma*C/(q*N) per coordinate."""
    server = _server(sigma=2.0, clip=0.5, expected=4.0, shape=(200, 200))
    mean = {A: torch.zeros(200, 200), H: torch.zeros(3)}  # no client changed anything
    server.apply_mean(1, mean, weight=4, clients=[0, 1, 2, 3])
    assert server.state[A].double().std().item() == pytest.approx(0.25, rel=0.02)


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 0.1, 100), (1.1, 0.25, 2),
                                                     (0.7, 1.0, 5)])
def test_rdp_epsilon_equals_opacus_and_pld_is_tighter(sigma, q, rounds):
    """RDP from dp-accounting against Opacus' RDP (written separately, same mechanism:
    Poisson-subsampled Gaussian, add/remove neighbours); the PLD figure we report must
    not exceed it. At sigma 1, q 0.1, 100 rounds: RDP 7.90, PLD 7.05."""
    acc = Accountant(sigma, q, 1e-5)
    orders = RDPAccountant.DEFAULT_ALPHAS
    opacus, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(
        q=q, noise_multiplier=sigma, steps=rounds, orders=orders), delta=1e-5)
    assert acc.epsilon_rdp(rounds) == pytest.approx(opacus, rel=2e-3)
    assert acc.epsilon_pld(rounds) <= acc.epsilon_rdp(rounds)
    assert acc.epsilon_pld(rounds) > 0.8 * acc.epsilon_rdp(rounds)


def test_the_issues_figures_for_one_setting():
    acc = Accountant(1.0, 0.1, 1e-5)
    assert acc.epsilon_rdp(100) == pytest.approx(7.90, abs=0.01)
    assert acc.epsilon_pld(100) == pytest.approx(7.05, abs=0.01)
    assert Accountant(0.0, 0.1, 1e-5).epsilon_pld(3) == math.inf


def test_participation_is_poisson_from_os_entropy_not_the_seed(monkeypatch):
    first, second = (SecretPoissonSampler(20, 0.25, 200) for _ in range(2))
    assert first.schedule != second.schedule  # 2^-4000-ish chance of a clash
    sizes = {len(c) for c in first.schedule.values()}
    assert len(sizes) > 1  # not a fixed-size draw
    counts = sum(len(c) for c in first.schedule.values())
    assert counts == pytest.approx(0.25 * 20 * 200, rel=0.15)
    assert first.schedule != {r: sample_clients(20, 5, 0, r) for r in range(1, 201)}
    # the only source is os.urandom: with its bytes fixed, the schedule is fixed
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(n % 256)) + bytes(n - n % 256))
    assert SecretPoissonSampler(20, 0.25, 5).schedule == \
        SecretPoissonSampler(20, 0.25, 5).schedule


DP = ("method=fedit", "clients.num=8", "clients.per_round=4", "privacy.enabled=true",
      "privacy.noise_multiplier=1.0", "data.min_partition_size=2")


def test_a_dp_run_keeps_who_took_part_out_of_its_released_files(tiny_config, tmp_path):
    cfg = tiny_config(*DP, "rounds=2", "eval.every=1")
    sim = Simulation(cfg)
    sim.run()
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert not set(line) & {str(m) for m in PARTICIPATION_METRICS}
        acc = Accountant(1.0, 0.5, cfg.privacy.delta)
        assert line["dp_epsilon"] == acc.epsilon_pld(line["round"])
        assert line["dp_epsilon_rdp"] == acc.epsilon_rdp(line["round"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary.get("bytes_up_total_per_client") is None
    # the schedule is in the checkpoint (the server's, never released), and only there
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    schedule = {int(r): c for r, c in ckpt.totals["sampler"]["schedule"].items()}
    assert schedule == sim.sampler.schedule


def test_a_methods_own_participation_metrics_stay_out_too(tiny_config, tmp_path):
    """TSFA's keep ratio and queue come from the round's clients' latencies (every
    metric a method's server stage reports): written without DP, withheld under it."""
    from sfedlora.methods.soft.tsfa import TsfaMetric

    tsfa = ("method=tsfa", "network.model=wireless", "network.allocation=min_max",
            "clients.num=8", "clients.per_round=4", "data.min_partition_size=2", "rounds=2",
            "eval.every=0")
    for private in (False, True):
        out = tmp_path / f"dp-{private}"
        Simulation(tiny_config(*tsfa, f"privacy.enabled={private}", f"output_dir={out}")).run()
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        shown = [set(line) & {str(m) for m in TsfaMetric} for line in lines]
        assert shown == ([set()] * 2 if private else [set(map(str, TsfaMetric))] * 2)


def test_a_resumed_dp_run_continues_the_schedule_it_drew(tiny_config, tmp_path):
    cfg = tiny_config(*DP, "rounds=3", "eval.every=0")
    first = Simulation(cfg)
    for r in (1, 2):
        first.run_round(r)
    run = tmp_path / "run"
    from sfedlora.runtime.results import RunDir

    rd = RunDir(run)
    rd.start(cfg, first.info.label_names)
    rd.save_checkpoint(first.checkpoint(2, 0.0, []))
    resumed = Simulation.resume(run)
    assert resumed.sampler.schedule == first.sampler.schedule
    assert resumed.sampler.sample(3) == first.sampler.sample(3)


def test_dp_refuses_min_clients_above_one(tiny_config):
    with pytest.raises(ConfigError, match=r"set clients\.min_clients=1"):
        tiny_config(*DP, "clients.min_clients=2")


def test_a_rejected_update_under_dp_is_logged_without_its_client(caplog):
    """run.log is released with the run: under DP a rejection names its reason, not
    the client (who took part is secret); without DP it names the client."""
    import logging

    for sigma, named in ((1.0, False), (None, True)):
        server = _server(sigma=sigma or 0.0, clip=1.0, expected=2.0)
        if sigma is None:
            server.privacy = None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sfedlora"):
            server.aggregate(1, [Reply(7, 5, b"not safetensors")])
        assert "rejected update" in caplog.text
        assert ("client 7" in caplog.text) is named
