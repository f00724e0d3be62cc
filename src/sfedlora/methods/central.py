"""Central training: the all-data reference every federated paper reports.

All clients' training parts are pooled on one trainer (client 0 holds the pool; the
other clients keep only their test and validation parts), which trains one global
adapter (A, B and head) on the same per-round budget as a federated round of
``clients.per_round`` clients: ``clients.per_round * local.steps`` steps per round, or
with ``local.epochs`` that many epochs over a seeded random subset of the pool as large
as the training data of the clients the round samples (over the whole pool it would
see ``clients.num / clients.per_round`` times what a federated round sees).
It is evaluated like every other method: on each client's test part and the global
test set. It runs through the same engine, so its byte counts are those of one client
exchanging the adapter each round; they are not a communication cost (the data itself
would have to move), and the benchmarks report none for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from functools import partial

import numpy as np

from sfedlora.core import seeds
from sfedlora.methods.base import LocalData, Method, ServerRound, ServerStage, Traits
from sfedlora.privacy.sampling import sample_clients

TRAINER = 0  # the client that holds the pooled training data


class OneTrainer(ServerStage):
    """Every round is trained by the trainer alone, whoever was sampled."""

    @contextlib.contextmanager
    def round(self, rnd: ServerRound):
        rnd.clients = [TRAINER]
        yield


def round_subset(cfg, splits: list, cid: int, size: int, round_idx: int
                 ) -> np.ndarray | None:
    """Under ``local.epochs``, a seeded random subset of the pool (``size`` examples on
    the trainer) as large as the training data of the round's sampled clients."""
    if cid != TRAINER or cfg.local.epochs is None:
        return None
    sampled = sample_clients(cfg.clients.num, cfg.clients_per_round, cfg.seed, round_idx)
    pool = sum(len(s.train) for s in splits)
    share = sum(len(splits[c].train) for c in sampled)
    count = round(size * share / pool) if pool else 0
    rng = np.random.default_rng([cfg.seed, seeds.CENTRAL_SUBSET, round_idx])
    return np.sort(rng.choice(size, size=count, replace=False))


class Central(Method):
    """reference: every client's training data pooled on one trainer, same total steps"""

    traits = Traits(secure_aggregation_refusal="trains one client; there is no sum to hide")

    def local_data(self, cfg, splits: list) -> LocalData:
        """Every client's training data on the trainer, which trains the round's total
        steps (``clients.per_round * local.steps``)."""
        pooled = np.concatenate([s.train for s in splits])
        steps = cfg.local.steps
        return LocalData(
            [replace(s, train=pooled if c == TRAINER else pooled[:0])
             for c, s in enumerate(splits)],
            steps=None if steps is None else steps * cfg.clients_per_round,
            round_subset=partial(round_subset, cfg, splits))

    def server_stage(self, cfg, layout, network) -> ServerStage:
        return OneTrainer()

    def check_config(self, cfg) -> None:
        refused = [(cfg.privacy.enabled, "privacy.enabled",
                    "client-level DP needs many clients; one trainer holds all data"),
                   (cfg.server_optimizer != "none", "server.optimizer",
                    "one trainer's adapter is the global one")]
        self.refuse(refused)
