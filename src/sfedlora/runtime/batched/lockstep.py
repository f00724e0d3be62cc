"""A batched sweep: several runs in one process, their clients trained in shared passes.

Each run is an ordinary :class:`~sfedlora.runtime.simulation.Simulation` with its own
run directory, data, server, client states and model; what the runs share is the
frozen base (each model's frozen tensors point at the first model's storage once they
are found equal, so R runs cost one base in memory) and the passes through it. The runs
take turns: each runs in a thread of its own, but only one at a time, from one
training round to the next. When every unfinished run is waiting for its clients'
local rounds, those rounds are trained together
(:meth:`~sfedlora.runtime.batched.training.BatchedTrainer.train_jobs`, each client with
its own run's learning rate, scale, optimizer and seed), and the runs go on in turn.

Taking turns keeps what is process-wide as if each run were alone: the default random
generators (each run's are saved when its turn ends and restored when its next one
starts), the log (each run's ``run.log`` takes its own thread's records) and the
working directory. So each run's directory holds what it would hold if run alone, up
to the summation order of the shared passes (the equality ``test_batched_sweep``
checks), and a run's result never depends on which other runs shared its process.

Why threads: the round loop calls its client pool and expects the fits back; a thread
lets a run wait inside that call while the others catch up, without rewriting the loop
as a coroutine. Only one thread runs at a time, so nothing here needs the loop to be
thread-safe.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper

from sfedlora.config import ExperimentConfig, resolve
from sfedlora.core.checkpoint import FILENAME as CHECKPOINT_FILE
from sfedlora.core.records import FitResult
from sfedlora.modeling.client_rows import ADAPTER
from sfedlora.runtime.batched.pool import BatchedPool
from sfedlora.runtime.batched.training import BatchedTrainer
from sfedlora.runtime.experiment import Experiment, build_experiment
from sfedlora.runtime.pool import InProcessPool
from sfedlora.runtime.results import RunDir
from sfedlora.runtime.worker import LocalRound, Worker

log = logging.getLogger(__name__)


class SweepPool(BatchedPool):
    """A run's client pool in a batched sweep: each round's clients are all handed to
    the sweep at once (``fit_group``: every sampled client), and scoring is what the
    run alone would do (one adapter at a time where ``clients.parallel`` is 1)."""

    fit_group = sys.maxsize

    def score(self, requests):
        if self.exp.cfg.clients.parallel == 1:
            return InProcessPool.score(self, requests)
        return super().score(requests)


@dataclass
class _Turn:
    """One run of the sweep: what it runs, and what passes between its thread and the
    one that schedules turns."""

    name: str
    body: Callable[[], dict]
    worker: Worker
    trainer: BatchedTrainer | None  # its group's shared trainer (None: trains alone)
    rng: dict = field(default_factory=dict)  # its generators' states between turns
    go: threading.Event = field(default_factory=threading.Event)
    parked: threading.Event = field(default_factory=threading.Event)
    request: list[LocalRound] | None = None
    reply: list[FitResult] | BaseException | None = None
    done: bool = False
    outcome: dict | BaseException | None = None

    def wait_for_turn(self) -> None:
        self.go.wait()
        self.go.clear()

    def end_turn(self) -> None:
        self.parked.set()


class _SharedTraining:
    """Stands in for a run's :class:`BatchedTrainer`: hands the run's local rounds to
    the sweep and waits, turn over, until they are trained with every other run's."""

    def __init__(self, turn: _Turn):
        self.turn = turn

    def train(self, runs: list[LocalRound]) -> list[FitResult]:
        turn = self.turn
        turn.request = runs
        turn.end_turn()
        turn.wait_for_turn()
        reply, turn.reply = turn.reply, None
        if isinstance(reply, BaseException):
            raise reply
        return reply


class Lockstep:
    """Runs added with :meth:`add` run together under :meth:`run`, each to its end."""

    def __init__(self) -> None:
        self.turns: list[_Turn] = []
        self.hosts: list[BatchedTrainer] = []  # one per distinct frozen base

    def add(self, name: str, pool: SweepPool, body: Callable[[], dict]) -> None:
        """A run whose clients live in ``pool`` and which ``body()`` runs to its end
        (``Simulation.run``), built by this thread just before: its generators' states
        now are where its first turn starts."""
        turn = _Turn(name, body, pool.exp.worker, None, _generators())
        if pool.trainer is not None:  # else its method trains one client at a time
            turn.trainer = self._host_for(pool.exp, pool.trainer)
            pool.trainer = _SharedTraining(turn)
        self.turns.append(turn)

    def _host_for(self, exp: Experiment, own: BatchedTrainer) -> BatchedTrainer:
        """The shared trainer of the first run whose frozen base equals ``exp``'s (whose
        storage ``exp``'s model then shares), or ``exp``'s own, which others may join."""
        for host in self.hosts:
            if share_frozen_base(host.worker, exp.worker):
                return host
        self.hosts.append(own)
        return own

    def run(self) -> dict[str, dict | BaseException]:
        """Every run to its end; each run's summary, or the exception that ended it
        (a failed run never stops the others)."""
        for turn in self.turns:
            threading.Thread(target=self._thread, args=(turn,), name=f"sweep:{turn.name}",
                             daemon=True).start()
        outer = _generators()
        try:
            while live := [t for t in self.turns if not t.done]:
                for turn in live:
                    self._give_turn(turn)
                self._train_waiting()
        finally:
            _restore(outer)
        return {t.name: t.outcome for t in self.turns}

    @staticmethod
    def _thread(turn: _Turn) -> None:
        turn.wait_for_turn()
        try:
            turn.outcome = turn.body()
        except BaseException as exc:  # reported by run(); the other runs go on
            turn.outcome = exc
        finally:
            turn.done = True
            turn.end_turn()

    @staticmethod
    def _give_turn(turn: _Turn) -> None:
        """Let ``turn`` run until it waits for training or ends."""
        _restore(turn.rng)
        turn.go.set()
        turn.parked.wait()
        turn.parked.clear()
        turn.rng = _generators()

    def _train_waiting(self) -> None:
        """Train every waiting run's local rounds, one shared call per frozen base."""
        waiting = [t for t in self.turns if not t.done and t.request is not None]
        for host in self.hosts:
            turns = [t for t in waiting if t.trainer is host]
            if not turns:
                continue
            jobs = [(t.worker, run) for t in turns for run in t.request]
            try:
                fits, left = host.train_jobs(jobs)
            except Exception as exc:  # each waiting run raises it in its own thread
                log.exception("batched sweep: shared training failed")
                for t in turns:
                    t.reply = exc
            else:
                start = 0
                for t in turns:
                    t.reply, start = fits[start:start + len(t.request)], start + len(t.request)
                    t.rng[t.worker.device.type] = left[t.worker]
            for t in turns:
                t.request = None


def share_frozen_base(host: Worker, other: Worker) -> bool:
    """Whether ``other``'s model can take ``host``'s shared passes: the same
    architecture, LoRA layers (ranks may differ) and dropout, adapter tensors of the
    same names, and frozen tensors equal to ``host``'s, which ``other`` then shares
    (its own copies are freed; each keeps its own original head). False, with
    nothing changed, otherwise."""
    if other is host:
        return True
    a, b = host.model, other.model
    if type(a) is not type(b) or host.device != other.device \
            or list(host.slots.params) != list(other.slots.params) \
            or _base_config(a) != _base_config(b) or _dropouts(a) != _dropouts(b):
        return False
    frozen_a, frozen_b = _shared_pass_tensors(host), _shared_pass_tensors(other)
    if frozen_a.keys() != frozen_b.keys() or any(
            p.shape != frozen_b[n].shape or p.dtype != frozen_b[n].dtype
            or not torch.equal(p, frozen_b[n]) for n, p in frozen_a.items()):
        return False
    with torch.no_grad():
        for n, p in frozen_b.items():
            p.data = frozen_a[n].data
    return True


def _shared_pass_tensors(worker: Worker) -> dict[str, torch.Tensor]:
    """The frozen tensors a shared pass computes with: every parameter but the adapter
    tensors and the original head under a trained copy (PEFT's ``modules_to_save``),
    which a shared pass replaces by each client's head and which may be initialised
    by the run's seed."""
    heads = tuple(f"{path}.original_module." for path, m in worker.model.named_modules()
                  if isinstance(m, ModulesToSaveWrapper))
    return {n: p for n, p in worker.model.named_parameters()
            if n not in worker.slots.params and not n.startswith(heads)}


def _base_config(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return config.to_dict() if config is not None else {}


def _dropouts(model) -> list[tuple[str, str]]:
    """Every dropout module of the model (the LoRA layers' included) and its setting."""
    return [(path, repr(m)) for path, m in model.named_modules()
            if isinstance(m, torch.nn.Dropout) or path.endswith(f"lora_dropout.{ADAPTER}")]


def _generators() -> dict:
    """The process's default random generators' states."""
    states = {"cpu": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def run_together(runs: list[tuple[str, ExperimentConfig]]) -> dict[str, dict | BaseException]:
    """Each ``(name, config)`` run to its end in one process, clients trained in shared
    passes (a run directory with a checkpoint is resumed from it, any other is started
    afresh); each run's summary, or the exception that ended it."""
    from sfedlora.runtime.simulation import Simulation

    lockstep = Lockstep()
    execution = {"batched_sweep_runs": len(runs)}

    def pool(cfg: ExperimentConfig) -> SweepPool:
        return SweepPool(build_experiment(cfg))

    for name, cfg in runs:
        run_dir = Path(cfg.output_dir)
        resume = (run_dir / CHECKPOINT_FILE).is_file()
        if resume:
            sim = Simulation.resume(run_dir, ["progress=false"], pool_factory=pool)
        else:
            cfg = resolve(cfg)  # once: the pool and the loop share it
            sim = Simulation(cfg, pool(cfg))
        lockstep.add(name, sim.pool, functools.partial(
            sim.run, RunDir(run_dir, execution=execution), overwrite=not resume))
    return lockstep.run()
