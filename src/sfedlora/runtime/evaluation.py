"""Evaluation of a federated run's adapters: which adapters are scored, where, and how
their scores become the round's metrics.

Personalised figures score each client's own adapter (global parts + its private
parts, or what its method makes of them) on its own test split; global figures score
the global adapter on the global test set where the method has one, and otherwise
each client's adapter there. Scoring runs where the adapter lives (the pool's
clients); combining is the task's (:meth:`sfedlora.tasks.Task.combine`).
"""

from __future__ import annotations

from sfedlora.core.records import Metric
from sfedlora.methods import Method
from sfedlora.runtime.pool import AdapterRequest, ClientPool
from sfedlora.runtime.server import Server
from sfedlora.tasks import Task

GLOBAL_VIA = 0  # the client whose process scores and exports the global adapter


class Evaluator:
    def __init__(self, num_clients: int, task: Task, method: Method, server: Server,
                 pool: ClientPool, scored: list[int] | None = None):
        """``scored``: the clients scored at every evaluation (default: all)."""
        self.num_clients, self.task, self.method = num_clients, task, method
        self.server, self.pool = server, pool
        self.scored = list(range(num_clients)) if scored is None else list(scored)
        self.samples: list[dict] = []  # generated answers of the last evaluation
        # the method's per-client values (FDLoRA's fusion weights), as last reported
        self.extras: dict[str, dict[str, list[float]]] = {}

    def client_request(self, cid: int, global_part: bool = False) -> AdapterRequest:
        shared, extras = self.server.evaluation_request(cid)
        return AdapterRequest(cid, cid, shared, extras, global_part)

    def global_request(self) -> AdapterRequest:
        _, extras = self.server.evaluation_request(GLOBAL_VIA)
        return AdapterRequest(None, GLOBAL_VIA, self.server.received_state(), extras, True)

    def requests(self, global_adapter: bool, per_client: bool) -> list[AdapterRequest]:
        """The evaluated clients' adapters (``per_client``; every client's with
        ``eval.clients: all``) and the global one where it exists. At 10,000 clients
        every client's adapter would be 10,000 PEFT directories; each client's state
        stays in the run's client-state store either way."""
        out = [self.client_request(c) for c in self.scored] if per_client else []
        return out + ([self.global_request()] if global_adapter else [])

    def evaluate(self) -> dict:
        has_global = self.method.roles.has_global_adapter
        requests = [self.client_request(c, global_part=not has_global) for c in self.scored]
        scores = self.pool.score(requests + ([self.global_request()] if has_global else []))
        clients = {c: s for c, s in scores.items() if c is not None}
        metrics, self.samples = self.task.combine([clients[c] for c in sorted(clients)],
                                                  scores.get(None))
        for cid, s in sorted(clients.items()):
            for key, value in s.extras.items():
                self.extras.setdefault(key, {})[str(cid)] = value
        for key, values in self.extras.items():
            metrics[key] = dict(sorted(values.items(), key=lambda kv: int(kv[0])))
        if len(self.scored) < self.num_clients:  # a subset: say which
            metrics[Metric.EVAL_CLIENTS.value] = self.scored
        if unscored := sorted(set(self.scored) - set(clients)):
            metrics[Metric.UNSCORED.value] = unscored  # the means are over the others
        return metrics
