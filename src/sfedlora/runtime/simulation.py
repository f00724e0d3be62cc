"""The round loop: one recipe for every runtime.

A round samples clients, has the server encode their downloads, asks the client pool
to train them, has the server check and combine the replies, counts the bytes, and,
on schedule, evaluates and checkpoints. The clients are reached only through a
:class:`~sfedlora.runtime.pool.ClientPool` (in this process, or Flower SuperNodes); what a
method or task does differently lives in the method's stages and the task component.
Every message is really serialised (safetensors) and parsed, so byte counts and what
the server sees are what a deployment would have.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sfedlora.comm.accounting import ByteCounter
from sfedlora.comm.network import build_network
from sfedlora.config import ConfigError, ExperimentConfig, load_config, resolve
from sfedlora.core.adapters import AdapterLayout
from sfedlora.core.checkpoint import FILENAME as CHECKPOINT_FILE
from sfedlora.core.checkpoint import Checkpoint, load_checkpoint
from sfedlora.core.records import PARTICIPATION_METRICS, Metric, Tensors, mean_or_none
from sfedlora.methods import Part, get_method, part_of
from sfedlora.methods.base import ServerRound, ServerStage
from sfedlora.privacy.dp import GaussianMechanism
from sfedlora.privacy.sampling import evaluated_clients, sampler_for
from sfedlora.privacy.stages import upload_stage
from sfedlora.runtime.evaluation import Evaluator
from sfedlora.runtime.inits import AdapterInits
from sfedlora.runtime.pool import ClientPool, InProcessPool
from sfedlora.runtime.results import RunDir, resolve_output_dir
from sfedlora.runtime.server import build_server
from sfedlora.runtime.uploads import PlainUploads
from sfedlora.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    metrics: dict
    seconds: dict = field(default_factory=dict)


class Simulation:
    """A federated run: the server, the client pool and the components the loop calls
    (byte counter, evaluator, run directory). Default pool: every client in this
    process (:class:`~sfedlora.runtime.pool.InProcessPool`)."""

    def __init__(self, cfg: ExperimentConfig, pool: ClientPool | None = None):
        cfg = self.cfg = cfg if cfg.is_resolved else resolve(cfg)
        if pool is None:
            from sfedlora.runtime.batched import BatchedPool
            from sfedlora.runtime.experiment import build_experiment

            exp = build_experiment(cfg)
            pool = BatchedPool(exp) if cfg.clients.parallel > 1 else InProcessPool(exp)
        self.pool = pool
        self.info = pool.info()
        self.method, self.task = get_method(cfg.method, cfg.options), get_task(cfg.task)
        self.inits = AdapterInits(cfg, self.method, self.info.layout)
        self.privacy = (GaussianMechanism(cfg.privacy, cfg.sample_rate, cfg.clients_per_round)
                        if cfg.privacy.enabled else None)
        self.sampler = sampler_for(cfg)
        layout = self.info.layout
        self.network = build_network(cfg.network, cfg.seed, cfg.clients.num,
                                     self.info.base_params)
        down = cfg.codec("down")
        self.server = build_server(
            self.method, self.inits.initial_server_state(), layout.spec, layout.names,
            cfg.server, cfg.clients.min_clients, self.privacy, down=down,
            optimizer=cfg.server_optimizer,
            ranks=([cfg.client_rank(c) for c in range(cfg.clients.num)]
                   if cfg.lora.client_ranks else None),
            client_start=self.inits.drawn_start,
            stage=self.method.server_stage(cfg, layout, self.network),
            down_history=cfg.comm.down_history,
            down_origin=self.inits.downlink_origin() if down.delta else None)
        self.bytes = ByteCounter(cfg.clients.num)
        self.evaluator = Evaluator(cfg.clients.num, self.task, self.method, self.server, pool,
                                   evaluated_clients(cfg.clients.num, cfg.eval.clients,
                                                     cfg.seed))
        # the server's side of the uploads: a privacy stage's, or the plain one
        self.uploads = upload_stage(cfg, self.server, pool) or PlainUploads(self.server, pool)
        self.done_rounds = 0
        self.prior_seconds = 0.0
        self.restored_metrics: list[str] = []

    # --- one round ------------------------------------------------------------------

    def run_round(self, round_idx: int) -> RoundRecord:
        rnd = ServerRound(round_idx, self.sampler.sample(round_idx), self.network)
        with self.server.stage.round(rnd):  # the method's stage may narrow the clients
            metrics, seconds = self._round(rnd)
        metrics |= rnd.metrics
        if rnd.dropped:
            metrics[Metric.DROPPED] = rnd.dropped
        if self.sampler.secret:  # who took part must not reach the released artefacts;
            # the stage's metrics are computed from the round's clients
            hidden = PARTICIPATION_METRICS | set(rnd.metrics)
            metrics = {k: v for k, v in metrics.items() if k not in hidden}
        if self.privacy is not None:
            pld, rdp = self.privacy.spent(round_idx)
            metrics[Metric.DP_EPSILON], metrics[Metric.DP_EPSILON_RDP] = pld, rdp
        return RoundRecord({str(k): v for k, v in metrics.items()}, seconds)

    def _round(self, rnd: ServerRound) -> tuple[dict, dict]:
        """Downloads, training, aggregation and the round's price; ``rnd`` gains the
        fits, who dropped and the latency, for the method's stage."""
        round_idx, clients = rnd.index, rnd.clients
        t0 = time.perf_counter()
        downloads = {cid: self.server.download(cid) for cid in clients}
        fits = self.uploads.fit(round_idx, downloads)
        rnd.dropped = [c for c in clients if c not in fits]
        for c in rnd.dropped:
            self.server.forget(c)
        clients = [c for c in clients if c in fits]
        rnd.fits = {c: fits[c] for c in clients}
        t1 = time.perf_counter()
        uploaded = self.uploads.aggregate(round_idx, fits)
        report, up, down = uploaded.report, uploaded.up, uploaded.down
        t2 = time.perf_counter()

        metrics = {
            Metric.ROUND: round_idx,
            Metric.CLIENTS: clients,
            Metric.TRAIN_LOSS: mean_or_none([f.train_loss for f in fits.values()]),
            Metric.GRAD_NORM_A: mean_or_none([f.grad_norm_A for f in fits.values()]),
            Metric.GRAD_NORM_B: mean_or_none([f.grad_norm_B for f in fits.values()]),
            Metric.AGGREGATED: report.applied,
            Metric.REJECTED: {str(c): why for c, why in report.rejected.items()},
            **self.bytes.record(up, down),
            Metric.NORM_A_MEAN: self.shared_a_norm(),
        }
        if self.network is not None:
            metrics |= self.network.price(round_idx, {c: up[c] for c in clients},
                                          {c: down[c] for c in clients},
                                          {c: fits[c].tokens or 0 for c in clients})
            rnd.latency = float(metrics[Metric.LATENCY_SECONDS])
        return metrics, {"train": t1 - t0, "aggregate": t2 - t1}

    def shared_a_norm(self) -> float | None:
        """Frobenius norm, over every adapted layer, of the A the server holds after this
        round's aggregation (None where the server holds no A): the averaged A whose
        shrinkage by sqrt(N) under independent inits the sfed scale compensates."""
        names = sorted(n for n in self.server.state if part_of(n) is Part.A)  # fixed order:
        if not names:  # a restored state's dict order may differ, the sum must not
            return None
        return float(sum(self.server.state[n].double().pow(2).sum() for n in names)) ** 0.5

    # --- adapters and evaluation ------------------------------------------------------

    def client_adapter(self, cid: int) -> Tensors | None:
        """Client ``cid``'s adapter as it is scored (None: its node is gone)."""
        return self.pool.adapters([self.evaluator.client_request(cid)]).get(cid)

    def global_adapter(self) -> Tensors | None:
        return self.pool.adapters([self.evaluator.global_request()]).get(None)

    def evaluate(self) -> dict:
        """Metrics of the current adapters; generated answers in ``self.samples``."""
        return self.evaluator.evaluate()

    @property
    def samples(self) -> list[dict]:
        return self.evaluator.samples

    def export_adapters(self, run_dir: RunDir) -> list[Path]:
        """PEFT adapters: the global one where there is one, and one per client where
        clients' scored adapters differ from it."""
        roles = self.method.roles
        requests = self.evaluator.requests(roles.has_global_adapter,
                                           roles.per_client_adapters)
        files = self.pool.export(requests)
        named = {("global" if r.cid is None else f"client_{r.cid}"): files.get(r.cid)
                 for r in requests}
        return run_dir.write_adapters(named, self.server.stage.export_lora(self.server.state))

    def should_evaluate(self, round_idx: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (round_idx % every == 0 or round_idx == self.cfg.rounds)

    # --- checkpoints ----------------------------------------------------------------

    def checkpoint(self, round_idx: int, wall_seconds: float, metrics: list[str]) -> Checkpoint:
        return Checkpoint(
            round=round_idx, server=self.server.state_dict(), pool=self.pool.state_dict(),
            totals={**self.bytes.state_dict(), "wall_seconds": wall_seconds,
                    **(self.network.state_dict() if self.network else {}),
                    "sampler": self.sampler.state_dict()},
            config=self.cfg.model_dump(mode="json"), metrics=metrics)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint of this same experiment."""
        self.server.load_state_dict(ckpt.server)
        self.pool.load_state_dict(ckpt.pool)
        self.bytes.load_state_dict(ckpt.totals)
        self.sampler.load_state_dict(ckpt.totals.get("sampler", {}))
        if self.network is not None:
            self.network.load_state_dict(ckpt.totals)
        self.done_rounds = ckpt.round
        self.prior_seconds = float(ckpt.totals.get("wall_seconds", 0.0))
        self.restored_metrics = ckpt.metrics

    def should_checkpoint(self, round_idx: int) -> bool:
        every = self.cfg.checkpoint.every
        return every > 0 and (round_idx % every == 0 or round_idx == self.cfg.rounds)

    def _save(self, run_dir: RunDir, round_idx: int, start: float) -> None:
        run_dir.save_checkpoint(self.checkpoint(round_idx, time.perf_counter() - start,
                                                run_dir.metrics_lines()))
        self.pool.checkpointed(round_idx)

    # --- the whole run --------------------------------------------------------------

    def run(self, run_dir: RunDir | None = None, overwrite: bool = False) -> dict:
        """Run the remaining rounds (all of them, or those after a restored checkpoint),
        writing metrics, checkpoints and finally the summary and adapters. A new run
        refuses a directory that holds another run unless ``overwrite``."""
        cfg = self.cfg
        run_dir = run_dir or RunDir(resolve_output_dir(cfg))
        self.run_dir = run_dir.path  # where this run is written
        first = self.done_rounds + 1
        run_dir.start(cfg, self.info.label_names, resume_after=self.done_rounds or None,
                      metrics=self.restored_metrics, overwrite=overwrite)
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
                run_dir.track()
                run_dir.log_samples(0, self.samples)
                run_dir.log_timing({"round": 0, "eval": time.perf_counter() - t})
            for round_idx in bar:
                started_at = time.time()  # wall clock: comparable across processes
                record = self.run_round(round_idx)
                evaluated = self.should_evaluate(round_idx)
                if evaluated:
                    t = time.perf_counter()
                    record.metrics.update(self.evaluate())
                    record.seconds["eval"] = time.perf_counter() - t
                    run_dir.log_samples(round_idx, self.samples)
                # every round's line, evaluated or not: per-round figures (bytes, the
                # network's latencies, TSFA's queue) are read round by round
                run_dir.log_metrics(record.metrics)
                self.done_rounds = round_idx  # its metrics line is written: done
                last = record.metrics  # the last round is always evaluated when eval is on
                run_dir.track()
                if evaluated:
                    loss = record.metrics.get(Metric.TRAIN_LOSS)
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.3f}")
                run_dir.log_timing({"round": round_idx, **record.seconds,
                                    "started_at": started_at, "ended_at": time.time()})
                if self.should_checkpoint(round_idx):
                    self._save(run_dir, round_idx, start)
                    saved = round_idx
        except KeyboardInterrupt:
            run_dir.track()
            if self.done_rounds > saved:
                self._save(run_dir, self.done_rounds, start)
            log.warning("interrupted after round %d; continue with --resume %s",
                        self.done_rounds, run_dir.path)
            run_dir.close()
            raise
        except BaseException:
            run_dir.close()
            raise
        self.export_adapters(run_dir)
        return run_dir.finish(cfg, self.info.base_path, last, time.perf_counter() - start)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] = (),
               pool_factory=None) -> Simulation:
        """A simulation that continues the run in ``run_dir`` from its checkpoint
        (``pool_factory(cfg)`` builds its client pool; default: in this process).

        Overrides may change only settings that do not change results (``progress``,
        ``checkpoint.every``); anything else is refused with the list of differences.
        """
        run_dir = Path(run_dir)
        ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
        cfg = resume_config(run_dir, ckpt, overrides)
        sim = cls(cfg, pool_factory(cfg) if pool_factory else None)
        sim.restore(ckpt)
        return sim


def resume_config(run_dir: Path, ckpt: Checkpoint, overrides=()) -> ExperimentConfig:
    """The run's config with ``overrides``, refused if it would change results."""
    cfg = load_config(run_dir / "config.yaml", [*overrides, f"output_dir={run_dir}"])
    # settings added since the checkpoint was written take their defaults, which keep
    # the old behaviour: only real changes count
    saved = resolve(ExperimentConfig.model_validate(ckpt.config)).model_dump(mode="json")
    diffs = config_differences(saved, cfg.model_dump(mode="json"), ignore=RESUME_MAY_CHANGE)
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir} with a config that would change results: "
            + "; ".join(diffs) + ". Drop those overrides (or restore config.yaml), or "
            "start a new run in another output_dir."
        )
    return cfg


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


def run_rounds(cfg: ExperimentConfig, server_stage: ServerStage | None = None
               ) -> tuple[list[dict], AdapterLayout]:
    """Train ``cfg.rounds`` rounds in this process, nothing written or evaluated, with
    ``server_stage`` in place of the method's (an offline study's recorder: TSFA's
    pilots); each round's metrics and the adapter's layout."""
    sim = Simulation(cfg)
    if server_stage is not None:
        sim.server.stage = server_stage
    return [sim.run_round(r).metrics for r in range(1, cfg.rounds + 1)], sim.info.layout
