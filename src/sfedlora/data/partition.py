"""Splitting a training set over clients, and each client's share into train/test.

The client partitioners are flwr-datasets' (IID, size-skewed, Dirichlet per class or
metadata group, k classes per client), seeded. The per-client train/test split is
stratified by hand: the ``datasets`` stratified split refuses classes with a single
example, which Dirichlet partitions produce all the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)

from sfedlora.config import ConfigError, DataConfig


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray  # indices into the training set
    test: np.ndarray


def partition_indices(labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int):
    """Indices of the training set held by each client."""
    n = len(labels)
    if num_clients > n:
        raise ConfigError(
            f"clients.num={num_clients} exceeds the {n} training examples; "
            "lower clients.num or use more data"
        )
    table = datasets.Dataset.from_dict({"label": labels.tolist(), "idx": list(range(n))})
    if cfg.partition == "iid":
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif cfg.partition == "size":  # IID content, client sizes growing exponentially
        table = table.shuffle(seed=seed)
        partitioner = ExponentialPartitioner(num_partitions=num_clients)
    elif cfg.partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    else:
        num_classes = int(labels.max()) + 1
        if cfg.classes_per_client > num_classes:
            raise ConfigError(
                f"data.classes_per_client={cfg.classes_per_client} exceeds the "
                f"{num_classes} classes in the data"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="random",
            seed=seed,
        )
    partitioner.dataset = table
    try:
        parts = [np.array(partitioner.load_partition(i)["idx"], dtype=np.int64)
                 for i in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"data.partition={cfg.partition!r} failed for {num_clients} clients: {exc}. "
            "Lower clients.num or data.min_partition_size, or raise data.dirichlet_alpha."
        ) from None
    return [np.sort(p) for p in parts]


def stratified_split(
    indices: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> ClientSplit:
    """Split ``indices`` so train and test have the same label mix (up to rounding)."""
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for cls in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == cls])
        k = int(np.floor(test_fraction * len(members) + 0.5))
        test.append(members[:k])
        train.append(members[k:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(te) == 0 and len(tr) > 1:  # tiny shares: keep at least one test example
        tr, te = tr[1:], tr[:1]
    return ClientSplit(tr, te)


def split_clients(
    labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
) -> list[ClientSplit]:
    rng = np.random.default_rng([seed, 17])
    splits = []
    for cid, idx in enumerate(partition_indices(labels, num_clients, cfg, seed)):
        if len(idx) < 2:
            raise ConfigError(
                f"client {cid} received {len(idx)} example(s) under data.partition="
                f"{cfg.partition!r}; each client needs at least 2. Lower clients.num or raise "
                "data.min_partition_size."
            )
        splits.append(stratified_split(idx, labels, cfg.client_test_fraction, rng))
    return splits
