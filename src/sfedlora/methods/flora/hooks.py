"""FLoRA's mechanics on both sides of the wire.

Server (:class:`MergeHistory`): the stacked factors of every round, and per client the
last round whose factors it has received; a download carries the factors of every
round the client has not received yet (all of them for a client that never replied).
Its whole state is checkpointed.

Client (:class:`BaseMerger`): brings the model's base weights to the newest round it
has been sent, in order. A process's model may serve several clients (the in-process
runtime, a Flower simulation worker), so it may be behind what a client has been
sent: the factors of every round pass through the runtime's shared tensor store
(memory in-process, the node's state directory on Flower), where the model catches up
from. Local steps run at the scale of the client's own rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from sfedlora.methods.base import ClientHooks, ServerHooks, Tensors, Update
from sfedlora.methods.flora.merging import (
    BaseWeights,
    MergeGap,
    merge_name,
    merged_lora,
    split_merges,
)
from sfedlora.methods.flora.method import stack


def _store_key(round_idx: int) -> str:
    return f"flora-merge-{round_idx}"


class MergeHistory(ServerHooks):
    def __init__(self, method, cfg):
        self.method, self.cfg = method, cfg
        self.merges: dict[int, Tensors] = {}  # round -> stacked factors
        self.synced: dict[int, int] = {}  # client -> last round whose factors it holds

    @property
    def merged_round(self) -> int:
        """The last round whose factors were merged (0: none yet)."""
        return max(self.merges, default=0)

    def after_combine(self, round_idx: int, updates: Sequence[Update]) -> None:
        ordered = sorted(updates, key=lambda u: u.client_id)
        cids = [u.client_id for u in ordered]
        self.merges[round_idx] = stack(ordered, self.method.weights(ordered),
                                       [self.cfg.client_rank(c) for c in cids],
                                       [self.cfg.client_gamma(c) for c in cids])

    def merges_since(self, round_idx: int) -> Tensors:
        """The factors of every round after ``round_idx``, named ``merge.<round>.<name>``."""
        return {merge_name(r, n): t for r in sorted(self.merges) if r > round_idx
                for n, t in self.merges[r].items()}

    def download_extras(self, cid: int | None, advance: bool = True) -> Tensors:
        since = self.synced.get(cid, 0) if cid is not None else 0
        extras = self.merges_since(since)
        if advance and cid is not None:
            self.synced[cid] = self.merged_round
        return extras

    def forget(self, cid: int) -> None:
        self.synced.pop(cid, None)

    def export_lora(self) -> tuple[Tensors, int]:
        return merged_lora(self.merges)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": {str(r): m for r, m in self.merges.items()},
                "synced": {str(c): r for c, r in self.synced.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = {int(r): m for r, m in state.get("rounds", {}).items()}
        self.synced = {int(c): int(r) for c, r in state.get("synced", {}).items()}


class BaseMerger(ClientHooks):
    def __init__(self, cfg, worker):
        self.cfg, self.worker = cfg, worker
        self.base = BaseWeights(worker.model)

    def receive(self, extras: Tensors) -> None:
        _, merges = split_merges(extras)
        store = self.worker.shared_store
        for round_idx, factors in merges.items():
            store.put(_store_key(round_idx), factors)
        newest = max(merges, default=self.base.round)
        missing = {}
        for round_idx in range(self.base.round + 1, newest + 1):
            factors = merges.get(round_idx) or store.get(_store_key(round_idx))
            if factors is None:
                raise MergeGap(f"base weights are at round {self.base.round}, and the merged "
                               f"factors of round {round_idx} were never received here")
            missing[round_idx] = factors
        self.base.apply(missing)

    @contextlib.contextmanager
    def training(self, cid: int):
        """Every LoRA layer at the scale of client ``cid``'s own rank inside the block."""
        value = self.cfg.client_gamma(cid)
        layers = list(self.base.layers.values())
        own = [layer.scaling["default"] for layer in layers]
        for layer in layers:
            layer.scaling["default"] = value
        try:
            yield
        finally:
            for layer, scale in zip(layers, own, strict=True):
                layer.scaling["default"] = scale
