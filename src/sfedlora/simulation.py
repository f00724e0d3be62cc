"""The in-process runtime: N simulated clients take turns on one model.

Every message is really serialised (safetensors) and parsed, so byte counts and what
the server sees are what a deployment would have. The loop holds no method logic:
the :class:`~sfedlora.worker.Worker` runs clients, the :class:`~sfedlora.server.Server`
combines, both as the method describes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sfedlora.checkpoint import FILENAME as CHECKPOINT_FILE
from sfedlora.checkpoint import Checkpoint, load_checkpoint
from sfedlora.config import ConfigError, ExperimentConfig, load_config
from sfedlora.evaluation import (
    AdapterView,
    Scores,
    combine_classification,
    evaluate_lm,
    score_adapter,
)
from sfedlora.experiment import Experiment, build_experiment
from sfedlora.methods import Part, part_of
from sfedlora.privacy import GaussianMechanism
from sfedlora.results import RunDir
from sfedlora.sampling import sample_clients
from sfedlora.server import Reply, Server
from sfedlora.worker import ClientState, FitResult, mean_or_none

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    metrics: dict
    seconds: dict = field(default_factory=dict)


class Simulation:
    checkpoints = True  # whether this runtime can write a checkpoint that resumes the run

    def __init__(self, cfg: ExperimentConfig, experiment: Experiment | None = None):
        self.cfg = cfg
        self.exp = experiment or build_experiment(cfg)
        worker = self.exp.worker
        self.method = worker.method
        self.privacy = (GaussianMechanism(cfg.privacy, cfg.clients_per_round / cfg.clients.num)
                        if cfg.privacy.enabled else None)
        self.server = Server(self.method, worker.initial_server_state(), worker.slots.spec(),
                             worker.slots.names, cfg.server, cfg.clients.min_clients,
                             self.privacy, down=cfg.codec("down"),
                             optimizer=cfg.server_optimizer,
                             ranks=([cfg.client_rank(c) for c in range(cfg.clients.num)]
                                    if cfg.lora.client_ranks else None),
                             scales=[cfg.client_gamma(c) for c in range(cfg.clients.num)]
                             if self.method.merge_into_base else None,
                             client_start=worker.drawn_start)
        self.states = {cid: ClientState() for cid in range(cfg.clients.num)}
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        self.bytes_per_client = {cid: {"up": 0, "down": 0} for cid in range(cfg.clients.num)}
        self.done_rounds = 0
        self.prior_seconds = 0.0
        self.restored_metrics: list[str] = []
        self.samples: list[dict] = []  # generated answers of the last evaluation (causal-lm)
        self.fusion_weights: dict[str, list[float]] = {}  # FDLoRA, last evaluation

    # --- one round ------------------------------------------------------------------

    def run_round(self, round_idx: int) -> RoundRecord:
        cfg = self.cfg
        clients = sample_clients(cfg.clients.num, cfg.clients_per_round, cfg.seed, round_idx)
        self._catch_up_base()
        t0 = time.perf_counter()
        downloads = {cid: self.server.download(cid) for cid in clients}
        down = {str(cid): len(d) for cid, d in downloads.items()}
        fits = self.fit_clients(round_idx, downloads)
        dropped = [c for c in clients if c not in fits]
        clients = [c for c in clients if c in fits]
        replies = [Reply(c, fits[c].num_examples, fits[c].upload) for c in clients]
        t1 = time.perf_counter()
        report = self.server.aggregate(round_idx, replies)
        t2 = time.perf_counter()

        up = {str(c): len(fits[c].upload) for c in clients}
        self.bytes_up_total += sum(up.values())
        self.bytes_down_total += sum(down.values())
        for c in clients:
            self.bytes_per_client[c]["up"] += up[str(c)]
            self.bytes_per_client[c]["down"] += down[str(c)]
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
            "bytes_total": self.bytes_up_total + self.bytes_down_total,
            "bytes_up_total_per_client": {str(c): b["up"]
                                          for c, b in self.bytes_per_client.items()},
            "bytes_down_total_per_client": {str(c): b["down"]
                                            for c, b in self.bytes_per_client.items()},
        }
        metrics["norm_A_mean"] = self.shared_a_norm()
        if dropped:
            metrics["dropped"] = dropped
        if self.privacy is not None:
            metrics["dp_epsilon"] = self.privacy.epsilon(round_idx)
        return RoundRecord(metrics, {"train": t1 - t0, "aggregate": t2 - t1})

    def shared_a_norm(self) -> float | None:
        """Frobenius norm, over every adapted layer, of the A the server holds after this
        round's aggregation (None where the server holds no A): the averaged A whose
        shrinkage by sqrt(N) under independent inits the sfed scale compensates."""
        names = sorted(n for n in self.server.state if part_of(n) is Part.A)  # fixed order:
        if not names:  # a restored state's dict order may differ, the sum must not
            return None
        return float(sum(self.server.state[n].double().pow(2).sum() for n in names)) ** 0.5

    # --- where the clients are --------------------------------------------------------
    # The two places a runtime differs: here every client runs in this process on the
    # one model; the Flower runtime (sfedlora.flower) overrides both to send messages.

    def fit_clients(self, round_idx: int, downloads: dict[int, bytes]) -> dict[int, FitResult]:
        """Each client's local round on its download, in client-id order; a client
        missing from the result dropped out."""
        return {cid: self.exp.worker.fit(cid, self.states[cid], download,
                                         self.exp.client_train[cid], round_idx)
                for cid, download in downloads.items()}

    def score_clients(self) -> dict[int, tuple[Scores, list[float] | None]]:
        """Every client's scores (own test part; the global test set and output norm
        where the method has no global adapter) and FDLoRA's fusion weights; a client
        missing from the result could not be scored (its node is gone)."""
        global_part = not self.method.has_global_adapter
        scores = {}
        for cid in range(self.cfg.clients.num):
            tensors, fusion = self._client_adapter(cid)
            scores[cid] = (score_adapter(self.exp, tensors, cid, global_part), fusion)
        return scores

    # --- evaluation -----------------------------------------------------------------

    # Adapters are built from the shared state as clients receive it: with a lossy
    # download (FLASC's mask) that is the model a client really holds.
    def _client_adapter(self, cid: int):
        tensors, fusion = self.exp.worker.scored_adapter(
            cid, self.states[cid], self.server.received_state(cid),
            self.exp.client_holdout[cid] if self.method.personal_adapter else None)
        if fusion is not None:
            self.fusion_weights[str(cid)] = fusion
        return tensors, fusion

    def client_adapter(self, cid: int):
        """Client ``cid``'s adapter; None where it cannot be had (a remote runtime
        whose node is gone), which the export skips."""
        return self._client_adapter(cid)[0]

    def client_adapters(self, cids: Sequence[int]) -> dict[int, dict | None]:
        """:meth:`client_adapter` for many clients (a remote runtime asks them all at
        once)."""
        return {cid: self.client_adapter(cid) for cid in cids}

    def global_adapter(self):
        return self.exp.worker.global_adapter(self.server.received_state())

    def _catch_up_base(self) -> None:
        """Bring the one model's base weights to the server's last merge (FLoRA): the
        evaluated model, and after a resume the base the next downloads continue."""
        if self.method.merge_into_base:
            self.exp.worker.base.apply(self.server.merges)

    def evaluate(self) -> dict:
        """Metrics of the current adapters (see :mod:`sfedlora.evaluation`); for a
        language model the generated answers are kept in ``self.samples``."""
        self._catch_up_base()
        if self.cfg.task == "causal-lm":
            view = AdapterView(self.exp, self.method.has_global_adapter, self.client_adapter,
                               self.global_adapter)
            metrics, self.samples = evaluate_lm(view)
        else:
            scores = self.score_clients()
            self.fusion_weights |= {str(c): f for c, (_, f) in scores.items() if f is not None}
            global_ = (score_adapter(self.exp, self.global_adapter(), None, global_part=True)
                       if self.method.has_global_adapter else None)
            metrics = combine_classification([s for _, (s, _) in sorted(scores.items())],
                                             global_)
            metrics["majority_baseline_accuracy"] = self.exp.majority_baseline()
            if unscored := sorted(set(range(self.cfg.clients.num)) - set(scores)):
                metrics["unscored"] = unscored  # the means are over the others
        if self.method.personal_adapter:
            metrics["fusion_weights"] = dict(sorted(self.fusion_weights.items(),
                                                    key=lambda kv: int(kv[0])))
        return metrics

    def should_evaluate(self, round_idx: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (round_idx % every == 0 or round_idx == self.cfg.rounds)

    # --- checkpoints ----------------------------------------------------------------

    def checkpoint(self, round_idx: int, wall_seconds: float, metrics: list[str]) -> Checkpoint:
        return Checkpoint(
            round=round_idx,
            server_state=self.server.state,
            server_optimizer=(self.server.optimizer.state_dict()
                              if self.server.optimizer else None),
            server_merges={"rounds": {str(r): m for r, m in self.server.merges.items()},
                           "synced": {str(c): r for c, r in self.server.synced.items()}},
            clients=self.states,
            totals={"bytes_up": self.bytes_up_total, "bytes_down": self.bytes_down_total,
                    "per_client": {str(c): b for c, b in self.bytes_per_client.items()},
                    "wall_seconds": wall_seconds},
            config=self.cfg.model_dump(mode="json"),
            metrics=metrics,
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint of this same experiment."""
        self.server.state = ckpt.server_state
        if self.server.optimizer is not None:
            self.server.optimizer.load_state_dict(ckpt.server_optimizer)
        merges = ckpt.server_merges or {"rounds": {}, "synced": {}}
        self.server.merges = {int(r): m for r, m in merges["rounds"].items()}
        self.server.synced = {int(c): int(r) for c, r in merges["synced"].items()}
        self.states = {cid: ckpt.clients.get(cid, ClientState())
                       for cid in range(self.cfg.clients.num)}
        self.bytes_up_total = int(ckpt.totals["bytes_up"])
        self.bytes_down_total = int(ckpt.totals["bytes_down"])
        self.bytes_per_client = {int(c): {k: int(v) for k, v in b.items()}
                                 for c, b in ckpt.totals["per_client"].items()}
        self.done_rounds = ckpt.round
        self.prior_seconds = float(ckpt.totals.get("wall_seconds", 0.0))
        self.restored_metrics = ckpt.metrics

    def should_checkpoint(self, round_idx: int) -> bool:
        every = self.cfg.checkpoint.every
        return self.checkpoints and every > 0 and (
            round_idx % every == 0 or round_idx == self.cfg.rounds)

    # --- the whole run --------------------------------------------------------------

    def run(self, run_dir: RunDir | None = None) -> dict:
        """Run the remaining rounds (all of them, or those after a restored checkpoint),
        writing metrics, checkpoints and finally the summary and adapters."""
        cfg = self.cfg
        run_dir = run_dir or RunDir(cfg.output_dir)
        first = self.done_rounds + 1
        run_dir.start(cfg, self.exp, resume_after=self.done_rounds or None,
                      metrics=self.restored_metrics)
        start = time.perf_counter() - self.prior_seconds
        last: dict = run_dir.last_metrics() or {}
        saved = self.done_rounds
        bar = tqdm(range(first, cfg.rounds + 1), desc=f"{cfg.method}", unit="round",
                   initial=first - 1, total=cfg.rounds, disable=not cfg.progress)
        try:
            if cfg.eval.at_start and self.done_rounds == 0:
                t = time.perf_counter()
                run_dir.log_metrics({"round": 0, "train_loss": None, "bytes_up": 0,
                                     "bytes_down": 0, **self.evaluate()})
                run_dir.log_samples(0, self.samples)
                run_dir.log_timing({"round": 0, "eval": time.perf_counter() - t})
            for round_idx in bar:
                started_at = time.time()  # wall clock: comparable across processes
                record = self.run_round(round_idx)
                if self.should_evaluate(round_idx):
                    t = time.perf_counter()
                    record.metrics.update(self.evaluate())
                    record.seconds["eval"] = time.perf_counter() - t
                    run_dir.log_metrics(record.metrics)
                    run_dir.log_samples(round_idx, self.samples)
                    bar.set_postfix(loss=f"{record.metrics['train_loss']:.3f}")
                run_dir.log_timing({"round": round_idx, **record.seconds,
                                    "started_at": started_at, "ended_at": time.time()})
                last = record.metrics  # the last round is always evaluated when eval is on
                if self.should_checkpoint(round_idx):
                    run_dir.save_checkpoint(self.checkpoint(
                        round_idx, time.perf_counter() - start, run_dir.metrics_lines()))
                    saved = round_idx
                self.done_rounds = round_idx
        except KeyboardInterrupt:
            if self.checkpoints and self.done_rounds > saved:
                run_dir.save_checkpoint(self.checkpoint(
                    self.done_rounds, time.perf_counter() - start, run_dir.metrics_lines()))
            log.warning("interrupted after round %d; continue with: sfedlora run --resume %s",
                        self.done_rounds, run_dir.path)
            run_dir.close()
            raise
        except BaseException:
            run_dir.close()
            raise
        return run_dir.finish(self, last, time.perf_counter() - start)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] = ()) -> Simulation:
        """A simulation that continues the run in ``run_dir`` from its checkpoint.

        Overrides may change only settings that do not change results (``progress``,
        ``checkpoint.every``); anything else is refused with the list of differences.
        """
        run_dir = Path(run_dir)
        ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
        cfg = load_config(run_dir / "config.yaml", [*overrides, f"output_dir={run_dir}"])
        diffs = config_differences(ckpt.config, cfg.model_dump(mode="json"),
                                   ignore=RESUME_MAY_CHANGE)
        if diffs:
            raise ConfigError(
                f"cannot resume {run_dir} with a config that would change results: "
                + "; ".join(diffs) + ". Drop those overrides (or restore config.yaml), or "
                "start a new run in another output_dir."
            )
        sim = cls(cfg)
        sim.restore(ckpt)
        return sim


RESUME_MAY_CHANGE = frozenset({"progress", "output_dir", "checkpoint.every"})


def config_differences(old: dict, new: dict, ignore=frozenset(), prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, ignore, f"{dotted}.")
        elif a != b and dotted not in ignore:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs
