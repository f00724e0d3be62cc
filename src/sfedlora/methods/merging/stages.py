"""Merging into the base weights, on both sides of the wire (FLoRA, FedEx-LoRA).

Server (:class:`MergeHistory`): the factors of every merge (what the method's
``merge_factors`` makes of an aggregated round's updates), numbered 1, 2, ... in the
order they were made, and per client the last merge it has received; a download
carries every merge the client has not received yet (all of them for a client that
never replied), or, once their factors outgrow the dense matrices they add up to (a
client absent for many rounds), a refresh holding the dense sum of every merge: a
download is never larger than the adapted layers' dense change. Merges are
numbered, not keyed by round, so a skipped round (too few good updates) leaves no gap
for a client to stumble on: the run goes on as if that round never happened.
Its whole state is checkpointed.

Client (:class:`BaseMerger`): brings the model's base weights to the newest round it
has been sent, in order. A process's model may serve several clients (the in-process
runtime, a Flower simulation worker), so it may be behind what a client has been
sent: the factors of every round pass through the runtime's shared tensor store
(memory in-process, the node's state directory on Flower), where the model catches up
from. Local steps run at the scale of the client's own rank (FLoRA's mixed ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from sfedlora.methods.base import (
    ClientStage,
    Part,
    ServerRound,
    ServerStage,
    Tensors,
    Update,
    part_of,
)
from sfedlora.methods.merging.factors import (
    BaseWeights,
    MergeGap,
    MergeKey,
    add_merge,
    dense_bytes,
    factor_bytes,
    merge_name,
    merged_lora,
    refresh_name,
    rounds_of,
    split_merges,
)


def merge_refusals(cfg) -> list[tuple[bool, str, str]]:
    """Settings no merging method runs with (clients merge exactly what the server
    recorded into their base weights), as :meth:`Method.refuse` triples."""
    return [
        (cfg.lora.adapter != "lora", "lora.adapter", "merging needs LoRA factors"),
        (cfg.server_optimizer != "none", "server.optimizer",
         "the merged factors are the exact weighted sum a server optimizer would change"),
        (cfg.server.aggregation != "mean", "server.aggregation",
         "the merged factors are exact for the weighted mean only"),
        (cfg.privacy.enabled, "privacy.enabled", "the merged factors carry no noise"),
        (not cfg.codec("down").lossless, "comm.down",
         "clients merge what they receive into their base weights, so a lossy download "
         "would drift them away from the server's record"),
        (cfg.clients.world_size > 1, "clients.world_size",
         "a client's helper processes keep their own copy of the base weights, which "
         "merging changes every round; use clients.world_size=1"),
    ]


def _store_key(round_idx: int) -> str:
    return f"flora-merge-{round_idx}"


class MergeHistory(ServerStage):
    def __init__(self, method, cfg):
        self.method, self.cfg = method, cfg
        self.merges: dict[int, Tensors] = {}  # merge number -> stacked factors
        self.synced: dict[int, int] = {}  # client -> last merge it holds
        self._refresh: tuple[int, Tensors] | None = None  # (merge, sum up to it)

    @property
    def merged_round(self) -> int:
        """The number of the last merge (0: none yet)."""
        return max(self.merges, default=0)

    @contextlib.contextmanager
    def round(self, rnd: ServerRound):
        """A client that did not reply is assumed to hold nothing it was sent: its
        next download catches it up from the start."""
        yield
        for cid in rnd.dropped:
            self.synced.pop(cid, None)

    def after_combine(self, round_idx: int, state: Tensors, updates: Sequence[Update]
                      ) -> Tensors:
        ordered = sorted(updates, key=lambda u: u.client_id)
        self.merges[self.merged_round + 1] = self.method.merge_factors(ordered, self.cfg)
        return state

    def merges_since(self, number: int) -> Tensors:
        """Every merge after merge ``number``, named ``merge.<number>.<name>``."""
        return {merge_name(r, n): t for r in sorted(self.merges) if r > number
                for n, t in self.merges[r].items()}

    def catch_up(self, since: int) -> Tensors:
        """What brings a client from merge ``since`` to the newest: the factors of
        every merge after it, or, where those are larger than the dense matrices they
        add up to, a refresh (the dense sum of every merge so far)."""
        factors = self.merges_since(since)
        if not factors or factor_bytes(factors) <= dense_bytes(self.merges[since + 1]):
            return factors
        last = self.merged_round
        done, total = self._refresh or (0, None)  # the sum so far, kept between rounds
        for r in range(done + 1, last + 1):
            total = add_merge(total, self.merges[r])
        self._refresh = last, total or {}
        return {refresh_name(last, n): t for n, t in self._refresh[1].items()}

    def download_extras(self, cid: int | None, advance: bool = True) -> Tensors:
        since = self.synced.get(cid, 0) if cid is not None else 0
        extras = self.catch_up(since)
        if advance and cid is not None:
            self.synced[cid] = self.merged_round
        return extras

    def export_lora(self, state: Tensors) -> tuple[Tensors, int]:
        """Every merged round plus the LoRA factors still in the server's state (none
        for FLoRA, whose factors are fresh; the averaged A and B for FedEx-LoRA), at
        the adapter's scale."""
        gamma = self.cfg.gamma
        live = {n: (gamma * t if part_of(n) is Part.A else t) for n, t in state.items()
                if part_of(n) in (Part.A, Part.B)}
        return merged_lora(self.merges, live)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": {str(r): m for r, m in self.merges.items()},
                "synced": {str(c): r for c, r in self.synced.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = {int(r): m for r, m in state.get("rounds", {}).items()}
        self.synced = {int(c): int(r) for c, r in state.get("synced", {}).items()}
        self._refresh = None


class BaseMerger(ClientStage):
    def __init__(self, cfg, worker):
        self.cfg, self.worker = cfg, worker
        self.base = BaseWeights(worker.model)

    def receive(self, extras: Tensors) -> None:
        """Bring the base weights to the newest merge sent: with the factors of each
        merge where this process has them all (from the download or the shared store),
        else with the refresh. Both give the same bits (:class:`BaseWeights`)."""
        _, merges = split_merges(extras)
        store = self.worker.shared_store
        for key, factors in merges.items():
            if isinstance(key, int):  # a refresh is one client's catch-up: not stored
                store.put(_store_key(key), factors)
        newest = max((rounds_of(k)[1] for k in merges), default=self.base.round)
        missing: dict[MergeKey, Tensors] = {}
        for round_idx in range(self.base.round + 1, newest + 1):
            factors = merges.get(round_idx) or store.get(_store_key(round_idx))
            if factors is None:
                refresh = next((k for k in merges if isinstance(k, tuple)), None)
                if refresh is None:
                    raise MergeGap(f"base weights are at round {self.base.round}, and the "
                                   f"merged factors of round {round_idx} were never "
                                   "received here")
                missing = {refresh: merges[refresh]}
                break
            missing[round_idx] = factors
        self.base.apply(missing)

    @contextlib.contextmanager
    def training(self, cid: int, state, round_idx: int):
        """Every LoRA layer at the scale of client ``cid``'s own rank inside the block."""
        value = self.cfg.client_gamma(cid)
        layers = list(self.base.layers.values())
        own = [layer.scaling["default"] for layer in layers]
        for layer in layers:
            layer.scaling["default"] = value
        try:
            yield None
        finally:
            for layer, scale in zip(layers, own, strict=True):
                layer.scaling["default"] = scale
