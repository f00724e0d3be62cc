"""Client pools: how the round loop reaches its clients.

The loop (:class:`sfedlora.runtime.simulation.Simulation`) talks to clients only through a
:class:`ClientPool`: train these clients on these downloads, score these adapters,
hand over these adapters (as tensors or as PEFT files), and keep or restore the
clients' state. :class:`InProcessPool` runs every client in this process on the one
model; :class:`sfedlora.runtime.flower.pool.FlowerPool` sends messages to Flower SuperNodes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sfedlora.core.adapters import AdapterLayout
from sfedlora.core.records import ClientScores, ClientState, FitResult, StageRequest, Tensors
from sfedlora.core.stages import Session
from sfedlora.privacy.stages import client_stage
from sfedlora.runtime.client_states import client_states
from sfedlora.runtime.experiment import Experiment


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter to score or hand over: client ``cid``'s (None: the global adapter),
    built where client ``via`` lives from the shared state as that client would receive
    it now and the method's extras it has not received yet."""

    cid: int | None
    via: int
    shared: Tensors
    extras: Tensors
    global_part: bool = False  # also score on the global test set (and output norm)


@dataclass(frozen=True)
class PoolInfo:
    """What the loop learns of the clients before round 1 (it builds no model)."""

    layout: AdapterLayout
    label_names: list[str]
    base_path: str
    base_params: int = 0  # parameters of the frozen base model


class ClientPool(Protocol):
    def info(self) -> PoolInfo: ...

    def fit(self, round_idx: int, downloads: dict[int, bytes],
            then: dict[int, StageRequest] | None = None) -> dict[int, FitResult]:
        """Each client's local round on its download; a client missing from the
        result dropped out. With ``then``, each client's fit passes through the client
        stage its request names (:meth:`~sfedlora.core.stages.ClientStage.after_fit`),
        and what that returns is all the client sends."""

    def exchange(self, round_idx: int, requests: dict[int, StageRequest]
                 ) -> dict[int, bytes]:
        """Each client's stage's reply to its request; missing: no reply."""

    def score(self, requests: list[AdapterRequest]) -> dict[int | None, ClientScores]:
        """The task's scores of each requested adapter; missing: could not be scored."""

    def adapters(self, requests: list[AdapterRequest]) -> dict[int | None, Tensors | None]:
        ...

    def export(self, requests: list[AdapterRequest]) -> dict[int | None, dict[str, bytes]]:
        """Each adapter saved by PEFT (``save_pretrained``): file name -> bytes."""

    def checkpointed(self, round_idx: int) -> None:
        """The loop's state after ``round_idx`` is safely on disk."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def saved_files(model, tensors: Tensors, slots) -> dict[str, bytes]:
    """``tensors`` loaded into the model and saved as a PEFT adapter, as file bytes.
    Embeddings are never trained here; "auto" would look the base up online."""
    slots.load(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        return {str(p.relative_to(tmp)): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


class InProcessPool:
    """Every client in this process, taking turns on the one model of ``exp``."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.states = client_states(exp.cfg)  # in memory, or on disk at scale
        self.sessions: dict[tuple[str, int], Session] = {}  # client stages', by client

    def info(self) -> PoolInfo:
        return PoolInfo(self.exp.worker.slots.layout, self.exp.data.label_names,
                        self.exp.base_path, self.exp.worker.base_params)

    def fit(self, round_idx: int, downloads: dict[int, bytes],
            then: dict[int, StageRequest] | None = None) -> dict[int, FitResult]:
        worker, fits = self.exp.worker, {}
        for cid, download in downloads.items():
            state = self.states.before(cid, round_idx)
            fit = worker.fit(cid, state, download, self.exp.round_train(cid, round_idx),
                             round_idx)
            self.states.after(cid, round_idx, state)
            fits[cid] = self.sent(cid, round_idx, download, fit, then)
        return fits

    def sent(self, cid: int, round_idx: int, download: bytes, fit: FitResult,
             then: dict[int, StageRequest] | None) -> FitResult:
        """What client ``cid`` sends of its fit: the fit, or what the client stage its
        request names makes of it."""
        if then is None:
            return fit
        key = (then[cid].stage, cid)
        self.sessions[key], fit = client_stage(then[cid].stage).after_fit(
            self.exp.worker, cid, round_idx, download, fit, self.sessions.get(key), then[cid])
        return fit

    def exchange(self, round_idx: int, requests: dict[int, StageRequest]
                 ) -> dict[int, bytes]:
        replies = {}
        for cid, request in requests.items():
            key = (request.stage, cid)
            self.sessions[key], replies[cid] = client_stage(request.stage).exchange(
                self.sessions.get(key), cid, request)
        return replies

    def _state(self, cid: int | None) -> ClientState:
        return self.states[cid] if cid is not None else ClientState()

    def _adapter(self, req: AdapterRequest) -> tuple[Tensors, dict[str, list[float]]]:
        return self.exp.adapter(req.cid, self._state(req.cid), req.shared, req.extras)

    def score(self, requests: list[AdapterRequest]) -> dict[int | None, ClientScores]:
        return {req.cid: self.exp.score(req.cid, self._state(req.cid), req.shared,
                                        req.extras, req.global_part)
                for req in requests}

    def adapters(self, requests: list[AdapterRequest]) -> dict[int | None, Tensors | None]:
        return {req.cid: self._adapter(req)[0] for req in requests}

    def export(self, requests: list[AdapterRequest]) -> dict[int | None, dict[str, bytes]]:
        worker = self.exp.worker
        return {req.cid: saved_files(worker.model, self._adapter(req)[0], worker.slots)
                for req in requests}

    def checkpointed(self, round_idx: int) -> None:
        self.states.checkpointed(round_idx)

    def state_dict(self) -> dict[str, Any]:
        return {**self.states.state_dict(),
                "shared": dict(self.exp.worker.shared_store.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.states.load_state_dict(state)
        self.exp.worker.shared_store.items.update(state.get("shared", {}))
