"""Splitting a training set over clients, and each client's share into train/test.

The client partitioners are flwr-datasets' (IID, size-skewed, Dirichlet per class or
metadata group, k classes per client), seeded. The per-client train/test split is
stratified by hand: the ``datasets`` stratified split refuses classes with a single
example, which Dirichlet partitions produce all the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)

from sfedlora.core import seeds
from sfedlora.settings import ConfigError, DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray  # indices into the training set
    test: np.ndarray
    # held out of training to choose hyperparameters on (data.validation_fraction)
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def partition_indices(labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int):
    """Indices of the training set held by each client."""
    n = len(labels)
    if num_clients > n:
        raise ConfigError(
            f"clients.num={num_clients} exceeds the {n} training examples; "
            "lower clients.num or use more data"
        )
    partitioner = make_partitioner(labels, num_clients, cfg, seed)
    try:
        rows = partition_rows(partitioner, num_clients)
    except ValueError as exc:
        raise ConfigError(
            f"data.partition={cfg.partition!r} failed for {num_clients} clients: {exc}. "
            "Lower clients.num or data.min_partition_size, or raise data.dirichlet_alpha."
        ) from None
    idx = np.asarray(partitioner.dataset["idx"], dtype=np.int64)  # the table's order
    return [np.sort(idx[r]) for r in rows]


def make_partitioner(labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int):
    """The seeded flwr-datasets partitioner of ``cfg.partition`` over a table of
    (label, index) rows."""
    n = len(labels)
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
    return partitioner


def partition_rows(partitioner, num_clients: int) -> list[np.ndarray]:
    """Each partition's row positions in the partitioner's table, read in one pass.

    flwr-datasets decides the whole assignment at once, but ``load_partition`` then
    selects one client's rows at a time (about a millisecond each: 10 s for 10,000
    clients). The assignment is read directly instead: IID's contiguous shards are
    ``np.array_split`` of the table; the others keep an id -> rows map (a private name
    of the flwr-datasets version pinned in pyproject). ``tests/test_partition.py`` checks
    every kind against ``load_partition``, so a library change fails there, not here.
    """
    n = len(partitioner.dataset)
    if isinstance(partitioner, IidPartitioner):
        return np.array_split(np.arange(n), num_clients)
    partitioner._determine_partition_id_to_indices_if_needed()
    mapping = partitioner._partition_id_to_indices
    return [np.asarray(mapping[i], dtype=np.int64) for i in range(num_clients)]


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
    empty = np.zeros(0, dtype=np.int64)
    tr, te = (np.sort(np.concatenate(part)) if part else empty for part in (train, test))
    if len(te) == 0 and len(tr) > 1:  # tiny shares: keep at least one test example
        tr, te = tr[1:], tr[:1]
    return ClientSplit(tr, te)


def largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``p * total`` (largest remainders
    first, ties to the lower index)."""
    exact = p * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


# How many times a client's Dirichlet label mix is drawn before a fixed-size partition
# gives up on fitting it into what the earlier clients left of each label.
MIX_DRAWS = 1000


def fixed_size_splits(labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
                      ) -> list[ClientSplit]:
    """Exactly ``cfg.examples_per_client`` training and ``cfg.client_test_examples`` test
    examples per client, disjoint across clients. Client k's label mix is the data's
    (``iid``) or a Dirichlet draw seeded by (seed, k) (``dirichlet``), and its examples
    are taken in turn from per-label pools shuffled once, so client k's data is the same
    whatever the number of clients: changing N changes only how many adapters are
    averaged, not each client's data size, steps or skew.

    A Dirichlet mix asking for more of a label than the earlier clients left is drawn
    again, seeded by (seed, k, draw), until it fits: without this, 20 clients of 65 BBC
    articles at alpha=1 could not be built for 2 seeds in 5. Draws that fit are kept as
    they are, so a partition that fit before is unchanged; redrawn clients lean away
    from the labels the earlier ones used up, and are logged."""
    train_size, test_size = cfg.examples_per_client, cfg.client_test_examples
    classes, frequency = np.unique(labels, return_counts=True)
    shuffle = np.random.default_rng([seed, seeds.PARTITION_SHUFFLE])
    pools = {c: shuffle.permutation(np.flatnonzero(labels == c)) for c in classes}
    used = dict.fromkeys(classes, 0)
    splits, redrawn = [], []
    for cid in range(num_clients):
        left = np.array([len(pools[c]) - used[c] for c in classes])
        counts, draw = _fitting_counts(cfg, frequency, left, seed, cid)
        if counts is None:
            _refuse(cfg, classes, pools, left, _counts(_mix(cfg, frequency, seed, cid, 0),
                                                         train_size, test_size), cid)
        if draw:
            redrawn.append(cid)
        parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        for part, part_counts in zip(("train", "test"), counts, strict=True):
            for c, count in zip(classes, part_counts, strict=True):
                parts[part].append(pools[c][used[c]:used[c] + count])
                used[c] += count
        splits.append(ClientSplit(np.sort(np.concatenate(parts["train"])),
                                  np.sort(np.concatenate(parts["test"]))))
    if redrawn:
        log.warning("data.partition='dirichlet': %d of %d clients' label mixes were drawn "
                    "again to fit what the earlier clients left (clients %s)",
                    len(redrawn), num_clients, redrawn)
    return splits


def _mix(cfg: DataConfig, frequency: np.ndarray, seed: int, cid: int, draw: int
         ) -> np.ndarray:
    """Client ``cid``'s label mix; draw 0 is seeded by (seed, cid) alone."""
    if cfg.partition == "iid":
        return frequency / frequency.sum()
    key = [seed, seeds.DIRICHLET_MIX, cid] + ([draw] if draw else [])
    return np.random.default_rng(key).dirichlet(np.full(len(frequency), cfg.dirichlet_alpha))


def _counts(mix: np.ndarray, train_size: int, test_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
    return largest_remainder(mix, train_size), largest_remainder(mix, test_size)


def _fitting_counts(cfg: DataConfig, frequency: np.ndarray, left: np.ndarray, seed: int,
                    cid: int) -> tuple[tuple[np.ndarray, np.ndarray] | None, int]:
    """The first of client ``cid``'s label mixes whose train and test counts fit in what
    is ``left`` of each label, and which draw it was; (None, draws) if none does."""
    draws = 1 if cfg.partition == "iid" else MIX_DRAWS  # the data's mix is fixed
    for draw in range(draws):
        counts = _counts(_mix(cfg, frequency, seed, cid, draw), cfg.examples_per_client,
                         cfg.client_test_examples)
        if (counts[0] + counts[1] <= left).all():
            return counts, draw
    return None, draws


def _refuse(cfg: DataConfig, classes: np.ndarray, pools: dict, left: np.ndarray,
            counts: tuple[np.ndarray, np.ndarray], cid: int) -> None:
    """Name the label client ``cid``'s first mix runs short of, and the fixes."""
    short = int(np.argmax(counts[0] + counts[1] - left))
    redraws = "" if cfg.partition == "iid" else (
        f", and none of {MIX_DRAWS - 1} redraws of its label mix fits")
    raise ConfigError(
        f"data.examples_per_client={cfg.examples_per_client} with data."
        f"client_test_examples={cfg.client_test_examples}: client {cid} needs "
        f"{counts[0][short] + counts[1][short]} examples of label id {int(classes[short])} "
        f"({counts[0][short]} to train, {counts[1][short]} to test), but only "
        f"{left[short]} are left of {len(pools[classes[short]])}{redraws}; lower "
        "clients.num or those sizes, or raise data.dirichlet_alpha")


def split_clients(
    labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
) -> list[ClientSplit]:
    splits = _client_splits(labels, num_clients, cfg, seed)
    if cfg.validation_fraction == 0:
        return splits
    rng = np.random.default_rng([seed, seeds.VALIDATION])
    out = []
    for split in splits:
        kept = stratified_split(split.train, labels, cfg.validation_fraction, rng)
        out.append(replace(split, train=kept.train, val=kept.test))
    return out


def _client_splits(
    labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
) -> list[ClientSplit]:
    if cfg.examples_per_client is not None:
        return fixed_size_splits(labels, num_clients, cfg, seed)
    rng = np.random.default_rng([seed, seeds.CLIENT_TEST])
    splits = [stratified_split(idx, labels, cfg.client_test_fraction, rng)
              for idx in partition_indices(labels, num_clients, cfg, seed)]
    report_small_clients(splits, cfg)
    return splits


def report_small_clients(splits: list[ClientSplit], cfg: DataConfig) -> None:
    """Log the clients a skewed partition leaves without training or test examples.
    They stay in the federation: a client without training examples is sampled like
    any other but its update is rejected (and recorded in the round's metrics), and a
    client without test examples is left out of the personalised metrics."""
    no_train = [cid for cid, s in enumerate(splits) if len(s.train) == 0]
    no_test = [cid for cid, s in enumerate(splits) if len(s.test) == 0]
    for what, cids in (("training", no_train), ("test", no_test)):
        if cids:
            log.warning("data.partition=%r leaves %d of %d clients without %s examples "
                        "(first: %s); raise data.min_partition_size or lower clients.num "
                        "to avoid it", cfg.partition, len(cids), len(splits), what,
                        cids[:10])
