"""Data for the classification task: sources and partitioning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfedlora.config import DataConfig
from sfedlora.data.partition import ClientSplit, split_clients, stratified_split
from sfedlora.data.sources import TextDataset, load_source


@dataclass(frozen=True)
class FederatedData:
    """Everything the experiment needs: the training pool, each client's split of
    it, and a global test set kept apart from every client."""

    train: TextDataset
    global_test: TextDataset
    clients: list[ClientSplit]

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


def build_federated_data(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    train, test = load_source(cfg)
    rng = np.random.default_rng([seed, 3])
    if test is None:
        split = stratified_split(np.arange(len(train)), train.labels, cfg.global_test_fraction, rng)
        train, test = train.subset(split.train), train.subset(split.test)
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = train.subset(np.sort(rng.permutation(len(train))[: cfg.max_train_examples]))
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        test = test.subset(np.sort(rng.permutation(len(test))[: cfg.max_test_examples]))
    return FederatedData(train, test, split_clients(train.labels, num_clients, cfg, seed))


__all__ = ["ClientSplit", "FederatedData", "TextDataset", "build_federated_data"]
