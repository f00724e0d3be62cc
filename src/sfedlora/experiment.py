"""Everything a runtime needs before round 1: data, tokenised splits, the one model,
and the worker that runs clients on it. Built once per process."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfedlora import lm
from sfedlora.adapters import derive_seed
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
    client_train: list[Encoded | lm.EncodedLM]
    client_test: list[Encoded | lm.EncodedLM]
    # each client's validation part (data.validation_fraction; else empty)
    client_val: list[Encoded | lm.EncodedLM]
    # FDLoRA: a slice of each client's training data kept out of training (else empty)
    client_holdout: list[Encoded | lm.EncodedLM]
    global_test: Encoded | lm.EncodedLM
    probe: Encoded | lm.EncodedLM
    worker: Worker
    base_path: str

    @property
    def gamma(self) -> float | None:
        """The LoRA scale (None for VeRA, which has none)."""
        if self.cfg.lora.adapter == "vera":
            return None
        return gamma(self.cfg.scaling, self.cfg.alpha, self.cfg.lora.rank,
                     self.cfg.clients_per_round)

    def majority_baseline(self) -> float:
        """Mean over clients of the accuracy of predicting the client's most frequent
        training label on its own test part: what a head that learned only its client's
        label skew scores (under Dirichlet splits, far above chance)."""
        scores = []
        for train, test in zip(self.client_train, self.client_test, strict=True):
            majority = np.bincount(train.labels).argmax()
            scores.append(float(np.mean(test.labels == majority)))
        return float(np.mean(scores))

    # causal-lm: the raw pairs behind the encoded test sets, for generation
    def client_test_pairs(self, cid: int) -> lm.PairDataset:
        return self.data.train.subset(self.data.clients[cid].test)

    def shots(self) -> list[tuple[str, str]]:
        """Solved training examples placed before each generation prompt (few-shot)."""
        k = self.cfg.eval.few_shot
        return list(zip(self.data.train.prompts[:k], self.data.train.responses[:k],
                        strict=True))


TAG_HOLDOUT = 204


def hold_out(data, size: int, seed: int):
    """``(train, holdout)``: a seeded random ``size`` examples (at most a fifth) apart."""
    n = len(data)
    size = max(1, min(size, n // 5))
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(order[size:])), data.subset(np.sort(order[:size]))


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    # Data first: its errors (missing column, too many clients) are cheap to find.
    data = build_federated_data(cfg.data, cfg.clients.num, cfg.seed, cfg.task)
    model, base_path = build_model(cfg, data.label_names)
    tokenizer = load_tokenizer(base_path)
    if cfg.task == "causal-lm":
        def enc(pairs):
            return lm.encode_pairs(tokenizer, pairs, cfg.model.max_length, cfg.data.packing)

        collate = lm.LMCollator(tokenizer)
        global_test = lm.encode_pairs(tokenizer, data.global_test, cfg.model.max_length)
        client_test = [lm.encode_pairs(tokenizer, data.train.subset(s.test),
                                       cfg.model.max_length) for s in data.clients]
        client_train = [enc(data.train.subset(s.train)) for s in data.clients]
        client_val = [lm.encode_pairs(tokenizer, data.train.subset(s.val),
                                      cfg.model.max_length) for s in data.clients]
    else:
        train = encode(tokenizer, data.train.texts, data.train.labels, cfg.model.max_length)
        test = data.global_test
        global_test = encode(tokenizer, test.texts, test.labels, cfg.model.max_length)
        collate = Collator(tokenizer)
        client_test = [train.subset(s.test) for s in data.clients]
        client_train = [train.subset(s.train) for s in data.clients]
        client_val = [train.subset(s.val) for s in data.clients]
    method = get_method(cfg.method)
    client_holdout = []
    if method.personal_adapter:
        split = [hold_out(t, cfg.personal.holdout, derive_seed(cfg.seed, TAG_HOLDOUT, c))
                 for c, t in enumerate(client_train)]
        client_train, client_holdout = [s[0] for s in split], [s[1] for s in split]
    probe = global_test.subset(np.arange(min(cfg.eval.probe_size, len(global_test))))
    worker = Worker(cfg, model, collate, method, tokenizer)
    return Experiment(
        cfg=cfg,
        data=data,
        client_train=client_train,
        client_test=client_test,
        client_val=client_val,
        client_holdout=client_holdout,
        global_test=global_test,
        probe=probe,
        worker=worker,
        base_path=base_path,
    )
