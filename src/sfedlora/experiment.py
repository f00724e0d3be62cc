"""Everything a runtime needs before round 1: data, tokenised splits, the one model,
and the worker that runs clients on it. Built once per process."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfedlora.config import ExperimentConfig
from sfedlora.data import FederatedData, build_federated_data
from sfedlora.methods import get_method
from sfedlora.scaling import gamma
from sfedlora.task import Collator, Encoded, build_model, encode, load_tokenizer
from sfedlora.worker import Worker


@dataclass
class Experiment:
    cfg: ExperimentConfig
    data: FederatedData
    client_train: list[Encoded]
    client_test: list[Encoded]
    global_test: Encoded
    probe: Encoded
    worker: Worker
    base_path: str

    @property
    def gamma(self) -> float:
        return gamma(self.cfg.scaling, self.cfg.lora.alpha, self.cfg.lora.rank,
                     self.cfg.clients_per_round)


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    # Data first: its errors (missing column, too many clients) are cheap to find.
    data = build_federated_data(cfg.data, cfg.clients.num, cfg.seed)
    model, base_path = build_model(cfg, data.label_names)
    tokenizer = load_tokenizer(base_path)
    train = encode(tokenizer, data.train.texts, data.train.labels, cfg.model.max_length)
    test = data.global_test
    global_test = encode(tokenizer, test.texts, test.labels, cfg.model.max_length)
    probe = global_test.subset(np.arange(min(cfg.eval.probe_size, len(global_test))))
    worker = Worker(cfg, model, Collator(tokenizer), get_method(cfg.method))
    return Experiment(
        cfg=cfg,
        data=data,
        client_train=[train.subset(s.train) for s in data.clients],
        client_test=[train.subset(s.test) for s in data.clients],
        global_test=global_test,
        probe=probe,
        worker=worker,
        base_path=base_path,
    )
