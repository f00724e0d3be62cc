"""Local rounds of several clients trained together: each step, every client's batch
goes through the shared model in one pass (:mod:`sfedlora.modeling.client_rows`),
one backward computes every client's gradients (a client's loss depends on its own
tensors only, so the sum's gradient is each client's own), and each client's optimizer
clips and steps its own tensors.

Each client keeps exactly what its sequential round keeps: its own copy of the adapter
(named as the model's tensors), its own optimizer (AdamW and SGD are elementwise, so K
optimizers are what one stacked optimizer would be, and each loads and saves the state
the sequential path stores), its own schedule, clipping and gradient norms, its own
batches and dropout stream. The first and last parts of a round are the worker's own
(``Worker.start_fit``, ``Worker.finish_fit``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import defaultdict

import torch
from peft.tuners.lora import LoraLayer

from sfedlora.core.records import FitResult, Tensors
from sfedlora.modeling.client_rows import (
    ADAPTER,
    AdapterSites,
    ClientRows,
    PaddedRandomness,
    RandomnessGuard,
    Unbatchable,
    rng_state,
    set_rng_state,
)
from sfedlora.runtime.worker import LocalRound, Worker

log = logging.getLogger(__name__)


class BatchedTrainer:
    """Trains a group of clients' local rounds on ``worker``'s model at once. Raises
    :class:`Unbatchable` for a model or method that cannot."""

    def __init__(self, worker: Worker):
        if refusal := worker.method.traits.batched_refusal:
            raise Unbatchable(f"method {worker.cfg.method} {refusal}")
        if worker.backward != worker.local_backward:
            raise Unbatchable("each client is trained by a process group "
                              "(clients.world_size > 1)")
        self.worker = worker
        self.sites = AdapterSites(worker.model, list(worker.slots.params))
        # Batches of different widths are padded alike (one pass per step) while the
        # model draws nothing random; once a random op meets padded rows, each width
        # gets a pass of its own, so every client's masks keep its own shape.
        self.pad_alike = getattr(worker.collate, "pads_right", False)
        self._scale_cache: dict[Worker, dict[str, float]] = {}

    def train(self, runs: list[LocalRound]) -> list[FitResult]:
        """The clients' local rounds, as many passes per step as their batches have
        distinct shapes; each round's fit, in order."""
        fits, _ = self.train_jobs([(self.worker, run) for run in runs])
        return fits

    def train_jobs(self, jobs: list[tuple[Worker, LocalRound]]
                   ) -> tuple[list[FitResult], dict[Worker, torch.Tensor]]:
        """:meth:`train` for local rounds of several runs at once (a batched sweep,
        :mod:`sfedlora.runtime.batched.lockstep`): each round with the worker of its own
        run, whose model shares this worker's frozen base, and which steps, clips,
        finishes and scales it. Also each worker's
        default-generator state after its last client, which a sequential run of its own
        would leave."""
        workers, runs = [w for w, _ in jobs], [run for _, run in jobs]
        params = [self._own_copy(w, run) for w, run in jobs]
        optimizers = [w.load_optimizer(w._optimizer(p), run.state)
                      for (w, run), p in zip(jobs, params, strict=True)]
        stages = _Contexts([w.stage.training(run.cid, run.state, run.round_idx)
                            for w, run in jobs])
        owners = list(dict.fromkeys(workers))  # each run's worker, in order
        scales = None if owners == [self.worker] else [self._scales(w) for w in workers]
        with stages:
            if any(penalty is not None for penalty in stages.values):
                raise RuntimeError("a client stage that trains batched yielded a "
                                   "penalty (see Traits.batched_refusal)")
            rng = self._dropout_streams(runs)
            for worker in owners:  # the clients' own copies train instead
                worker.slots.set_trainable(())
                worker.model.train()
            self.worker.model.train()
            for k in range(max(len(run.batches) for run in runs)):
                active = [i for i, run in enumerate(runs) if k < len(run.batches)]
                for i in active:
                    workers[i].set_lr(optimizers[i], runs[i], k)
                self._step([jobs[i] for i in active], [params[i] for i in active],
                           [rng[i] for i in active], k,
                           None if scales is None else [scales[i] for i in active])
                for i in active:
                    workers[i].step(runs[i], params[i], optimizers[i])
            fits: list[FitResult | None] = [None] * len(jobs)
            left = {}
            for worker in owners:
                mine = [i for i, w in enumerate(workers) if w is worker]
                # what the sequential path leaves in the default generator: the last
                # client's stream, after its steps
                set_rng_state(worker.device, rng[mine[-1]][0])
                for i in mine:
                    # each client's stage sees its trained adapter on the model as it
                    # leaves the steps (FDLoRA keeps a copy), and its own download's
                    # extras
                    worker.slots.load({n: t.detach() for n, t in params[i].items()})
                    stages.exit(i)
                    worker.stage.receive(runs[i].extras)
                    fits[i] = worker.finish_fit(runs[i], optimizers[i])
                left[worker] = rng_state(worker.device)
        return fits, left

    def _scales(self, worker: Worker) -> dict[str, float]:
        """The LoRA scale of each of ``worker``'s layers, by the layer's A name."""
        if worker not in self._scale_cache:
            self._scale_cache[worker] = {
                f"{path}.lora_A.{ADAPTER}.weight": module.scaling[ADAPTER]
                for path, module in worker.model.named_modules()
                if isinstance(module, LoraLayer)}
        return self._scale_cache[worker]

    @staticmethod
    def _own_copy(worker: Worker, run: LocalRound) -> Tensors:
        """The client's adapter as leaves of its own, trainable as the round's plan says."""
        slots, device = worker.slots, worker.device
        return {n: run.start[n].to(device=device, dtype=p.dtype, copy=True)
                .requires_grad_(slots.parts[n] in run.plan.train)
                for n, p in slots.params.items()}

    def _dropout_streams(self, runs: list[LocalRound]) -> list[list[torch.Tensor]]:
        """Each client's generator state as its sequential round seeds it (one-item
        lists, so passes can advance them in place)."""
        device, streams = self.worker.device, []
        outer = rng_state(device)
        for run in runs:
            torch.manual_seed(run.dropout_seed)
            streams.append([rng_state(device)])
        set_rng_state(device, outer)
        return streams

    def _step(self, jobs: list[tuple[Worker, LocalRound]], params: list[Tensors],
              rng: list[list[torch.Tensor]], k: int,
              scales: list[dict[str, float]] | None) -> None:
        """Forward and backward of step ``k`` for ``jobs``; logs each client's loss."""
        batches = [worker.batch(run.data, run.batches[k]) for worker, run in jobs]
        for (_, run), batch in zip(jobs, batches, strict=True):
            run.tokens += batch["input_ids"].numel()  # positions of its own width
        losses = (self._padded_alike(jobs, batches, params, rng, k, scales)
                  if self.pad_alike else None)
        if losses is None:
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i, batch in enumerate(batches):
                groups[tuple(batch["input_ids"].shape[1:])].append(i)
            losses = {}
            for members in groups.values():
                losses |= self._pass([batches[i] for i in members],
                                     [params[i] for i in members],
                                     [rng[i] for i in members], members,
                                     scales=None if scales is None
                                     else [scales[i] for i in members])
        total = torch.stack([losses[i] for i in sorted(losses)]).sum()
        total.backward()
        for i, (_, run) in enumerate(jobs):
            run.losses.append(losses[i].item())

    def _padded_alike(self, jobs, batches, params, rng, k, scales
                      ) -> dict[int, torch.Tensor] | None:
        """One pass with every batch padded to the widest; None where a random op met
        the padding (and from then on, a pass per width)."""
        widths = [b["input_ids"].shape[1] for b in batches]
        if len(set(widths)) == 1:
            return None
        width = max(widths)
        padded = [b if w == width else worker.batch(run.data, run.batches[k], width=width)
                  for (worker, run), b, w in zip(jobs, batches, widths, strict=True)]
        try:
            return self._pass(padded, params, rng, list(range(len(jobs))), padded=True,
                              scales=scales)
        except PaddedRandomness as exc:
            log.info("batched training: the model draws random numbers (%s), so batches "
                     "of different widths take a pass each", exc)
            self.pad_alike = False
            return None

    def _pass(self, batches, params, rng, members, padded: bool = False, scales=None
              ) -> dict[int, torch.Tensor]:
        worker = self.worker
        inputs = {key: torch.cat([b[key] for b in batches])
                  for key in batches[0] if key != "labels"}
        states = [r[0] for r in rng]
        rows = ClientRows(self.sites, [len(b["input_ids"]) for b in batches], params, states,
                          padded, scales)
        guard = RandomnessGuard(worker.device)
        with rows.applied(worker.model):
            logits = worker.model(**inputs).logits
        guard.check()
        for r, state in zip(rng, states, strict=True):
            r[0] = state
        return {i: worker.task.train_loss(worker.model, part, b["labels"])
                for i, part, b in zip(members, rows.split(logits), batches, strict=True)}


class _Contexts:
    """Each client's stage context, entered together and left one by one (in order,
    each with its client's adapter on the model), or all at once on an error."""

    def __init__(self, contexts: list[contextlib.AbstractContextManager]):
        self.contexts = contexts
        self.values: list = []
        self.open: list[bool] = []

    def __enter__(self) -> _Contexts:
        try:
            for context in self.contexts:
                self.values.append(context.__enter__())
                self.open.append(True)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def exit(self, i: int) -> None:
        self.open[i] = False
        self.contexts[i].__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        for i in reversed(range(len(self.open))):
            if self.open[i]:
                self.open[i] = False
                self.contexts[i].__exit__(*exc)
