"""Skewed partitions at scale leave some clients with one example or none: they are
reported, and never crash a round (issue 19)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sfedlora.config import DataConfig
from sfedlora.data.partition import split_clients
from sfedlora.runtime.simulation import Simulation

SKEWED = ("data.partition=dirichlet", "data.dirichlet_alpha=0.1", "data.min_partition_size=0")


def test_empty_partitions_are_reported_not_refused(caplog):
    labels = np.repeat(np.arange(3), 40)
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.1, min_partition_size=0)
    with caplog.at_level(logging.WARNING, logger="sfedlora.data.partition"):
        splits = split_clients(labels, 100, cfg, seed=0)
    empty = [cid for cid, s in enumerate(splits) if len(s.train) == 0]
    assert empty, "this partition should leave clients empty"
    assert f"leaves {len(empty)} of 100 clients without training examples" in caplog.text
    used = np.concatenate([np.concatenate([s.train, s.test]) for s in splits])
    assert sorted(used.tolist()) == list(range(len(labels)))  # still every example once


def test_a_round_with_empty_and_one_example_clients_completes(tiny_config):
    cfg = tiny_config("method=fedsa", *SKEWED, "clients.num=60", "rounds=1",
                      "local.steps=2")
    sim = Simulation(cfg)
    sizes = [len(s.train) for s in sim.pool.exp.data.clients]
    assert 0 in sizes and 1 in sizes  # both kinds are in this federation
    summary = sim.run()
    record = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    rejected = {int(c) for c in record["rejected"]}
    assert rejected == {c for c, n in enumerate(sizes) if n == 0}
    assert all("no training examples" in why for why in record["rejected"].values())
    assert record["aggregated"] is True  # the others were averaged
    assert np.isfinite(summary["personalized_accuracy"])
