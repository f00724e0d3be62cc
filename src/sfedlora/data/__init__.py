"""Layer 5, data: federated data for any task: the task's pools, a global test set,
client splits.

May import: ``core``, ``settings``, ``comm``, ``aggregation``, ``privacy``, ``modeling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sfedlora.core import seeds
from sfedlora.data.partition import ClientSplit, split_clients, stratified_split
from sfedlora.data.sources import TextDataset
from sfedlora.settings import DataConfig

if TYPE_CHECKING:
    from sfedlora.modeling.lm import PairDataset


class Task(Protocol):
    """What building federated data needs of a task (:class:`sfedlora.tasks.Task` has
    it; the data layer sits below the tasks)."""

    def load_pools(self, cfg: DataConfig) -> tuple[Any, Any | None, list[str]]:
        """The training pool, the global test pool where the source has one, and the
        names of what clients are partitioned by."""

    def partition_labels(self, pool: Any) -> np.ndarray:
        """Per example of a pool, the id clients are partitioned by."""


@dataclass(frozen=True)
class FederatedData:
    """Everything the experiment needs: the training pool, each client's split of
    it, and a global test set kept apart from every client. For classification the
    pools are :class:`TextDataset`; for causal-lm :class:`~sfedlora.modeling.lm.PairDataset`,
    whose "labels" are metadata groups used only for partitioning."""

    train: TextDataset | PairDataset
    global_test: TextDataset | PairDataset
    clients: list[ClientSplit]
    label_names: list[str]


def build_federated_data(cfg: DataConfig, num_clients: int, seed: int,
                         task: Task) -> FederatedData:
    """The task's pools, a global test set apart from every client, and each client's
    split of the training pool (by the task's partition labels)."""
    train, test, names = task.load_pools(cfg)
    rng = np.random.default_rng([seed, seeds.GLOBAL_TEST])
    if test is None:
        split = stratified_split(np.arange(len(train)), task.partition_labels(train),
                                 cfg.global_test_fraction, rng)
        train, test = train.subset(split.train), train.subset(split.test)
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = train.subset(np.sort(rng.permutation(len(train))[: cfg.max_train_examples]))
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        test = test.subset(np.sort(rng.permutation(len(test))[: cfg.max_test_examples]))
    return FederatedData(train, test, split_clients(task.partition_labels(train), num_clients,
                                                    cfg, seed), names)


__all__ = ["ClientSplit", "FederatedData", "TextDataset", "build_federated_data"]
