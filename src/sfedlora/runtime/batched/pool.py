"""The in-process pool with up to ``clients.parallel`` clients training at once."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from sfedlora.core.records import ClientScores, FitResult, StageRequest
from sfedlora.modeling.client_rows import Unbatchable
from sfedlora.runtime.batched.training import BatchedTrainer
from sfedlora.runtime.experiment import Experiment
from sfedlora.runtime.pool import AdapterRequest, InProcessPool
from sfedlora.runtime.worker import LocalRound

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it
    to the system. A batched pass allocates activations of hundreds of MB each step;
    glibc serves blocks that large with fresh mmaps, so every step would fault in (and
    zero) every page again, which measured a fifth of a CPU step's time. PyTorch's CPU
    tuning guide swaps in jemalloc or tcmalloc for the same reason; this needs no
    install. The process keeps its peak memory. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


class BatchedPool(InProcessPool):
    """:class:`~sfedlora.runtime.pool.InProcessPool` whose round trains the sampled
    clients in groups of ``clients.parallel`` (in sampling order), each group in one
    pass per step (:class:`~sfedlora.runtime.batched.training.BatchedTrainer`), and
    scores as many adapters at once. Every
    client's fit, state and upload are those of the one-at-a-time pool. A model or
    method that cannot train batched trains one at a time, with a warning saying why."""

    fit_group: int | None = None  # clients per training call (default clients.parallel)

    def __init__(self, exp: Experiment):
        super().__init__(exp)
        self.parallel = exp.cfg.clients.parallel
        try:
            self.trainer: BatchedTrainer | None = BatchedTrainer(exp.worker)
        except Unbatchable as exc:
            log.warning("clients.parallel=%d: clients train one at a time, since %s",
                        self.parallel, exc)
            self.trainer = None
        if self.trainer is not None and exp.worker.device.type == "cpu":
            keep_freed_memory()

    def score(self, requests: list[AdapterRequest]) -> dict[int | None, ClientScores]:
        """Up to ``clients.parallel`` adapters scored in shared passes (where the task
        can: :meth:`~sfedlora.tasks.Task.score_many`)."""
        if self.trainer is None:  # the method's stage changes the model between them
            return super().score(requests)
        out = {}
        for start in range(0, len(requests), self.parallel):
            group = requests[start:start + self.parallel]
            made = [self._adapter(req) for req in group]
            scores = self.exp.task.score_many(self.exp, [
                (tensors, req.cid, req.global_part)
                for req, (tensors, _) in zip(group, made, strict=True)])
            for req, (_, values), found in zip(group, made, scores, strict=True):
                out[req.cid] = ClientScores(found.values, values, found.samples)
        return out

    def fit(self, round_idx: int, downloads: dict[int, bytes],
            then: dict[int, StageRequest] | None = None) -> dict[int, FitResult]:
        if self.trainer is None:
            return super().fit(round_idx, downloads, then)
        cids, fits, size = list(downloads), {}, self.fit_group or self.parallel
        for start in range(0, len(cids), size):
            group = cids[start:start + size]
            states = {cid: self.states.before(cid, round_idx) for cid in group}
            runs = {cid: self.exp.worker.start_fit(
                        cid, states[cid], downloads[cid], self.exp.round_train(cid, round_idx),
                        round_idx) for cid in group}
            training = [run for run in runs.values() if isinstance(run, LocalRound)]
            trained = dict(zip([run.cid for run in training],
                               self.trainer.train(training) if training else [], strict=True))
            for cid in group:
                self.states.after(cid, round_idx, states[cid])
                fit = trained.get(cid, runs[cid])
                fits[cid] = self.sent(cid, round_idx, downloads[cid], fit, then)
        return fits
