"""Client sampling: which clients take part in a round.

Without DP the draw is a seeded, public function of (seed, round), so every runtime
draws the same clients and a run repeats exactly. Under ``privacy.enabled`` it must be
secret: amplification by subsampling, which the accountant credits, holds only while
nobody outside knows who took part. :class:`SecretPoissonSampler` then includes each
client independently with probability q from OS entropy (the sampling the accountant
assumes), draws the whole schedule once, and keeps it in the checkpoint, so a resumed
run continues the same schedule.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from sfedlora.core import seeds


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


class ClientSampler(Protocol):
    secret: bool  # whether who took part must stay out of released artefacts

    def sample(self, round_idx: int) -> list[int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SeededSampler:
    """``per_round`` clients without replacement, from the config seed (public)."""

    secret = False

    def __init__(self, num_clients: int, per_round: int, seed: int):
        self.num_clients, self.per_round, self.seed = num_clients, per_round, seed

    def sample(self, round_idx: int) -> list[int]:
        return sample_clients(self.num_clients, self.per_round, self.seed, round_idx)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def secure_uniforms(count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) with 53 random bits each, from ``os.urandom`` (the
    OS's CSPRNG, the one secret source of the project: DP noise draws from it too)."""
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def poisson_draw(num_clients: int, rate: float) -> list[int]:
    """Each client independently with probability ``rate`` (ascending ids)."""
    return [int(c) for c in np.flatnonzero(secure_uniforms(num_clients) < rate)]


class SecretPoissonSampler:
    """Poisson sampling at rate ``rate`` from the OS's CSPRNG, never from the config
    seed. The schedule of every round is drawn at construction; a resumed run
    loads it from the checkpoint (:meth:`load_state_dict`) and continues it."""

    secret = True

    def __init__(self, num_clients: int, rate: float, rounds: int):
        if not 0 < rate <= 1:
            raise ValueError(f"sampling rate {rate} must lie in (0, 1]")
        self.schedule = {r: poisson_draw(num_clients, rate)
                         for r in range(1, rounds + 1)}

    def sample(self, round_idx: int) -> list[int]:
        return list(self.schedule[round_idx])

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": {str(r): c for r, c in self.schedule.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule = {int(r): [int(c) for c in cs]
                         for r, cs in state["schedule"].items()}


def sampler_for(cfg) -> ClientSampler:
    """The sampler a run uses: secret Poisson sampling under DP, else seeded."""
    if cfg.privacy.enabled:
        return SecretPoissonSampler(cfg.clients.num, cfg.sample_rate, cfg.rounds)
    return SeededSampler(cfg.clients.num, cfg.clients_per_round, cfg.seed)
