"""Everything a process that runs clients needs before round 1: data, the task's
encoded sets, the one model, and the worker that runs clients on it. Built once per
process (a Flower ServerApp never builds one: it runs no client)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sfedlora.config import resolve
from sfedlora.core import seeds
from sfedlora.core.records import ClientScores
from sfedlora.data import FederatedData, build_federated_data
from sfedlora.methods import Method, get_method
from sfedlora.methods.base import LocalData
from sfedlora.modeling import lm
from sfedlora.modeling.model import build_model, load_tokenizer
from sfedlora.privacy.stages import check_clients
from sfedlora.runtime.worker import Worker
from sfedlora.settings import ExperimentConfig
from sfedlora.tasks import Task, get_task


@dataclass
class Experiment:
    cfg: ExperimentConfig
    task: Task
    method: Method
    data: FederatedData
    local: LocalData  # what the method's clients train on
    client_train: list
    client_test: list
    client_val: list  # each client's validation part (data.validation_fraction; else empty)
    # examples kept out of training for the method's own use (FDLoRA); else empty
    client_holdout: list
    global_test: object
    probe: object
    worker: Worker
    base_path: str

    def adapter(self, cid: int | None, state, shared, extras
                ) -> tuple[dict, dict[str, list[float]]]:
        """Client ``cid``'s scored adapter (None: the global adapter) from the shared
        state it would receive and the method's extras it has not received yet, and
        the method's per-client values. The same for every runtime."""
        worker = self.worker
        worker.stage.receive(extras)
        if cid is None:
            return worker.inits.global_adapter(shared), {}
        holdout = self.client_holdout[cid] if self.client_holdout else None
        return worker.scored_adapter(cid, state, shared, holdout)

    def round_train(self, cid: int, round_idx: int):
        """The training examples client ``cid`` uses in round ``round_idx``: its training
        data, or the part of it the method chooses (``LocalData.round_subset``)."""
        data = self.client_train[cid]
        choose = self.local.round_subset
        subset = None if choose is None else choose(cid, len(data), round_idx)
        return data if subset is None else data.subset(subset)

    def score(self, cid: int | None, state, shared, extras, global_part: bool
              ) -> ClientScores:
        """The task's scores of :meth:`adapter`, with the method's per-client values."""
        tensors, values = self.adapter(cid, state, shared, extras)
        scores = self.task.score(self, tensors, cid, global_part)
        return ClientScores(scores.values, values, scores.samples)

    # causal-lm: the raw pairs behind the encoded test sets, for generation
    def client_test_pairs(self, cid: int) -> lm.PairDataset:
        return self.data.train.subset(self.data.clients[cid].test)

    def shots(self) -> list[tuple[str, str]]:
        """Solved training examples placed before each generation prompt (few-shot)."""
        k = self.cfg.eval.few_shot
        return list(zip(self.data.train.prompts[:k], self.data.train.responses[:k],
                        strict=True))


def hold_out(data, size: int, seed: int):
    """``(train, holdout)``: a seeded random ``size`` examples (at most a fifth) apart."""
    n = len(data)
    size = max(1, min(size, n // 5))
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(order[size:])), data.subset(np.sort(order[:size]))


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    cfg = cfg if cfg.is_resolved else resolve(cfg)
    task, method = get_task(cfg.task), get_method(cfg.method, cfg.options)
    # Data first: its errors (missing column, too many clients) are cheap to find.
    data = build_federated_data(cfg.data, cfg.clients.num, cfg.seed, task)
    model, base_path = build_model(cfg, task, data.label_names)
    tokenizer = load_tokenizer(base_path)
    # the clients' own splits stay in ``data``; training follows the method's (central)
    local = method.local_data(cfg, data.clients)
    sets = task.encode(cfg, tokenizer, replace(data, clients=local.splits))
    client_train, client_holdout = sets.train, []
    if holdout := local.holdout:
        split = [hold_out(t, holdout, seeds.derive_seed(cfg.seed, seeds.HOLDOUT, c))
                 for c, t in enumerate(client_train)]
        client_train, client_holdout = [s[0] for s in split], [s[1] for s in split]
    check_clients(cfg, method, [len(t) for t in client_train])
    probe = sets.global_test.subset(
        np.arange(min(cfg.eval.probe_size, len(sets.global_test))))
    worker = Worker(cfg, model, task, method, tokenizer, local.steps)
    if cfg.clients.world_size > 1:
        from sfedlora.runtime.client_group import ClientGroup

        worker.backward = ClientGroup(cfg, model, worker.slots.params, task,
                                      data.label_names).backward
    return Experiment(cfg=cfg, task=task, method=method, data=data, local=local,
                      client_train=client_train,
                      client_test=sets.test, client_val=sets.val,
                      client_holdout=client_holdout, global_test=sets.global_test,
                      probe=probe, worker=worker, base_path=base_path)
