"""Client sampling is seeded and draws the configured number of clients."""

from __future__ import annotations

from sfedlora.config import load_config
from sfedlora.sampling import sample_clients


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
