"""The in-process runtime: N simulated clients take turns on one model.

Every message is really serialised (safetensors) and parsed, so byte counts and what
the server sees are what a deployment would have. The loop holds no method logic:
the :class:`~sfedlora.worker.Worker` runs clients, the :class:`~sfedlora.server.Server`
combines, both as the method describes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from sfedlora.config import ExperimentConfig
from sfedlora.experiment import Experiment, build_experiment
from sfedlora.results import RunDir
from sfedlora.sampling import sample_clients
from sfedlora.server import Reply, Server
from sfedlora.worker import ClientState, EvalResult, mean_or_none


@dataclass
class RoundRecord:
    metrics: dict
    seconds: dict = field(default_factory=dict)


class Simulation:
    def __init__(self, cfg: ExperimentConfig, experiment: Experiment | None = None):
        self.cfg = cfg
        self.exp = experiment or build_experiment(cfg)
        worker = self.exp.worker
        self.method = worker.method
        self.server = Server(self.method, worker.initial_server_state(), worker.slots.shapes(),
                             worker.slots.names, cfg.clients.min_clients)
        self.states = {cid: ClientState() for cid in range(cfg.clients.num)}
        self.bytes_up_total = 0
        self.bytes_down_total = 0

    # --- one round ------------------------------------------------------------------

    def run_round(self, round_idx: int) -> RoundRecord:
        cfg, worker = self.cfg, self.exp.worker
        clients = sample_clients(cfg.clients.num, cfg.clients_per_round, cfg.seed, round_idx)
        t0 = time.perf_counter()
        download = self.server.download()
        replies, fits = [], {}
        for cid in clients:
            fit = worker.fit(cid, self.states[cid], download, self.exp.client_train[cid],
                             round_idx)
            fits[cid] = fit
            replies.append(Reply(cid, fit.num_examples, fit.upload))
        t1 = time.perf_counter()
        report = self.server.aggregate(round_idx, replies)
        t2 = time.perf_counter()

        up = {str(c): len(fits[c].upload) for c in clients}
        down = {str(c): len(download) for c in clients}
        self.bytes_up_total += sum(up.values())
        self.bytes_down_total += sum(down.values())
        metrics = {
            "round": round_idx,
            "clients": clients,
            "train_loss": float(np.mean([f.train_loss for f in fits.values()])),
            "grad_norm_A": mean_or_none([f.grad_norm_A for f in fits.values()]),
            "grad_norm_B": mean_or_none([f.grad_norm_B for f in fits.values()]),
            "aggregated": report.applied,
            "rejected": {str(c): why for c, why in report.rejected.items()},
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_per_client": up,
            "bytes_down_per_client": down,
            "bytes_up_total": self.bytes_up_total,
            "bytes_down_total": self.bytes_down_total,
        }
        return RoundRecord(metrics, {"train": t1 - t0, "aggregate": t2 - t1})

    # --- evaluation -----------------------------------------------------------------

    def client_adapter(self, cid: int):
        return self.exp.worker.assemble(cid, self.states[cid], self.server.state)

    def global_adapter(self):
        return self.exp.worker.global_adapter(self.server.state)

    def evaluate(self) -> dict:
        """Personalised accuracy (each client's adapter on its own test part) and
        global accuracy (the global adapter where the method has one, else the mean
        over clients of each client's adapter on the global test set)."""
        worker, exp = self.exp.worker, self.exp
        own: list[EvalResult] = []
        on_global: list[EvalResult] = []
        norms: list[float] = []
        for cid in range(self.cfg.clients.num):
            tensors = self.client_adapter(cid)
            own.append(worker.evaluate(tensors, exp.client_test[cid]))
            if not self.method.has_global_adapter:
                on_global.append(worker.evaluate(tensors, exp.global_test))
                norms.append(worker.adapter_output_norm(tensors, exp.probe))
        if self.method.has_global_adapter:
            tensors = self.global_adapter()
            on_global.append(worker.evaluate(tensors, exp.global_test))
            norms.append(worker.adapter_output_norm(tensors, exp.probe))
        return {
            "personalized_accuracy": float(np.mean([r.accuracy for r in own])),
            "personalized_accuracy_weighted": sum(r.correct for r in own)
            / sum(r.count for r in own),
            "personalized_loss": float(np.mean([r.loss for r in own])),
            "global_accuracy": float(np.mean([r.accuracy for r in on_global])),
            "global_loss": float(np.mean([r.loss for r in on_global])),
            "adapter_output_norm": float(np.mean(norms)),
        }

    # --- the whole run --------------------------------------------------------------

    def should_evaluate(self, round_idx: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (round_idx % every == 0 or round_idx == self.cfg.rounds)

    def run(self, run_dir: RunDir | None = None) -> dict:
        cfg = self.cfg
        run_dir = run_dir or RunDir(cfg.output_dir)
        run_dir.start(cfg, self.exp)
        start = time.perf_counter()
        last: dict = {}
        bar = tqdm(range(1, cfg.rounds + 1), desc=f"{cfg.method}", unit="round",
                   disable=not cfg.progress)
        try:
            for round_idx in bar:
                record = self.run_round(round_idx)
                if self.should_evaluate(round_idx):
                    t = time.perf_counter()
                    record.metrics.update(self.evaluate())
                    record.seconds["eval"] = time.perf_counter() - t
                    run_dir.log_metrics(record.metrics)
                    bar.set_postfix(loss=f"{record.metrics['train_loss']:.3f}",
                                    acc=f"{record.metrics['personalized_accuracy']:.3f}")
                run_dir.log_timing({"round": round_idx, **record.seconds})
                last = record.metrics  # the last round is always evaluated when eval is on
        except BaseException:
            run_dir.close()
            raise
        summary = run_dir.finish(self, last, time.perf_counter() - start)
        return summary
