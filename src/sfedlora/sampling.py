"""Seeded client sampling: which clients take part in a round."""

from __future__ import annotations

import numpy as np

from sfedlora import seeds


def evaluated_clients(num_clients: int, k: int | str, seed: int) -> list[int]:
    """The clients scored at every evaluation: all of them, or a fixed seeded subset of
    ``k`` (the same in every round and every runtime), ascending."""
    if k == "all" or k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, seeds.EVAL_CLIENTS])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """``per_round`` distinct client ids in ascending order, a pure function of
    (seed, round), so any runtime draws the same clients."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, seeds.SAMPLE, round_idx])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
