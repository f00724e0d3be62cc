"""Data for the classification task: sources and partitioning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfedlora.config import DataConfig
from sfedlora.data.partition import ClientSplit, split_clients, stratified_split
from sfedlora.data.sources import TextDataset, load_frames, load_source
from sfedlora.lm import PairDataset, pairs_from_frame


@dataclass(frozen=True)
class FederatedData:
    """Everything the experiment needs: the training pool, each client's split of
    it, and a global test set kept apart from every client. For classification the
    pools are :class:`TextDataset`; for causal-lm :class:`~sfedlora.lm.PairDataset`,
    whose "labels" are metadata groups used only for partitioning."""

    train: TextDataset | PairDataset
    global_test: TextDataset | PairDataset
    clients: list[ClientSplit]
    label_names: list[str]


def _load(cfg: DataConfig, task: str):
    if task == "classification":
        train, test = load_source(cfg)
        return train, test, train.label_names, train.labels
    frame, test_frame, where = load_frames(cfg)
    train, groups = pairs_from_frame(frame, cfg, where)
    test = pairs_from_frame(test_frame, cfg, cfg.test_path or where, groups)[0] \
        if test_frame is not None else None
    return train, test, [str(g) for g in groups], train.groups


def build_federated_data(cfg: DataConfig, num_clients: int, seed: int,
                         task: str = "classification") -> FederatedData:
    train, test, names, labels = _load(cfg, task)
    rng = np.random.default_rng([seed, 3])
    if test is None:
        split = stratified_split(np.arange(len(train)), labels, cfg.global_test_fraction, rng)
        train, test = train.subset(split.train), train.subset(split.test)
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = train.subset(np.sort(rng.permutation(len(train))[: cfg.max_train_examples]))
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        test = test.subset(np.sort(rng.permutation(len(test))[: cfg.max_test_examples]))
    labels = train.labels if task == "classification" else train.groups
    return FederatedData(train, test, split_clients(labels, num_clients, cfg, seed), names)


__all__ = ["ClientSplit", "FederatedData", "TextDataset", "build_federated_data"]
