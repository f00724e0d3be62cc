"""Client sampling is seeded and draws the configured number of clients."""

from __future__ import annotations

from sfedlora.config import load_config
from sfedlora.privacy.sampling import sample_clients


def test_all_clients_when_per_round_covers_everyone():
    assert sample_clients(5, 5, seed=0, round_idx=3) == [0, 1, 2, 3, 4]


def test_count_is_seeded_sorted_and_varies_by_round():
    draws = [sample_clients(20, 4, seed=7, round_idx=r) for r in range(1, 6)]
    assert draws == [sample_clients(20, 4, seed=7, round_idx=r) for r in range(1, 6)]
    assert all(len(d) == 4 == len(set(d)) and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert draws != [sample_clients(20, 4, seed=8, round_idx=r) for r in range(1, 6)]


def test_fraction_resolves_to_a_fixed_count():
    assert load_config(None, ["clients.num=10", "clients.per_round=0.3"]).clients_per_round == 3
    assert load_config(None, ["clients.num=10", "clients.per_round=1.0"]).clients_per_round == 10
    assert load_config(None, ["clients.num=10", "clients.per_round=4"]).clients_per_round == 4
    assert load_config(None, ["clients.num=10", "clients.per_round=all"]).clients_per_round == 10


def test_evaluated_clients_are_a_fixed_seeded_subset():
    from sfedlora.privacy.sampling import evaluated_clients

    assert evaluated_clients(6, "all", seed=0) == list(range(6))
    assert evaluated_clients(6, 6, seed=0) == list(range(6))
    subset = evaluated_clients(10_000, 25, seed=3)
    assert subset == evaluated_clients(10_000, 25, seed=3) == sorted(set(subset))
    assert len(subset) == 25 and subset != evaluated_clients(10_000, 25, seed=4)


def test_eval_clients_larger_than_n_is_refused_before_the_run():
    import pytest

    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.clients=11 must be between 1 and "
                                          r"clients\.num=10"):
        load_config(None, ["clients.num=10", "eval.clients=11"])


def test_a_run_scores_and_exports_only_its_evaluated_clients(tiny_config, monkeypatch,
                                                              tmp_path):
    from sfedlora.privacy.sampling import evaluated_clients
    from sfedlora.runtime.pool import InProcessPool
    from sfedlora.runtime.results import RunDir
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config("method=fedsa", "clients.num=5", "eval.clients=2", "rounds=2",
                      "eval.global_metrics=false")
    asked: list[list] = []
    real = InProcessPool.score
    monkeypatch.setattr(InProcessPool, "score",
                        lambda self, reqs: asked.append([r.cid for r in reqs]) or real(self, reqs))
    sim = Simulation(cfg)
    subset = evaluated_clients(5, 2, cfg.seed)
    for r in (1, 2):
        sim.run_round(r)
        metrics = sim.evaluate()
        assert metrics["eval_clients"] == subset and "unscored" not in metrics
    assert asked == [subset, subset]  # fedsa has no global adapter: clients only
    exported = sim.export_adapters(RunDir(tmp_path / "run"))
    assert sorted(p.name for p in exported) == [f"client_{c}" for c in sorted(subset)]
