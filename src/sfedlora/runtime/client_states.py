"""Where each client's private state (B, head, optimizer state, error-feedback
residuals, method-owned tensors) lives between the rounds it trains.

* :class:`MemoryStates`: a dict in the process (the default for small populations;
  checkpoints copy it).
* :class:`DiskStates`: one folder per client under the run directory
  (``RUN/clients/client-<id>/``), one safetensors file per round the client trained,
  written atomically, and an in-memory cache of the most recently used clients. A
  population of 10,000 clients with a private B costs disk, not memory, and a
  checkpoint only records the round it covers: reads are "as of" a round, so a run
  killed after training some clients of round r and resumed from round r - 1 trains
  them again from the state before r, bit for bit (files older than what the newest
  checkpoint needs are removed, and on resume every file of a round after the
  checkpoint). Files are written like checkpoints: fsynced, renamed, the rename
  fsynced. A Flower node keeps its client's state with the same
  layout (:mod:`sfedlora.runtime.flower.node_state`).

One file per client and round rather than a sharded store: a client's state is
written once per round it trains and read once per round it trains or is evaluated,
so per-client files make every access one small atomic read or write, need no index,
and let the file system (not us) handle concurrency and crashes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sfedlora.core.checkpoint import decode_client_state, encode_client_state, write_atomically
from sfedlora.core.records import ClientState
from sfedlora.settings import ConfigError, ExperimentConfig

FOLDER = "clients"  # under the run directory


class ClientStateFolder:
    """One client's states by round: ``round-<r>.safetensors`` in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def rounds(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        return {int(p.stem.removeprefix("round-")): p
                for p in self.folder.glob("round-*.safetensors")}

    def newest(self, at_most: int) -> tuple[int, ClientState]:
        """The newest round <= ``at_most`` it trained and the state after it (0 and a
        fresh state if none)."""
        rounds = {r: p for r, p in self.rounds().items() if r <= at_most}
        if not rounds:
            return 0, ClientState()
        newest = max(rounds)
        return newest, decode_client_state(rounds[newest].read_bytes())

    def load(self, at_most: int) -> ClientState:
        """The state after the newest round <= ``at_most`` it trained (fresh if none)."""
        return self.newest(at_most)[1]

    def save(self, round_idx: int, state: ClientState, checkpointed: int) -> None:
        """Write the state after ``round_idx`` atomically (a process killed mid-write
        leaves the previous file), then remove files the newest checkpoint no longer
        needs: all at or before it except the newest of those."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / f"round-{round_idx}.safetensors",
                         encode_client_state(state))
        rounds = self.rounds()
        kept = max((r for r in rounds if r <= checkpointed), default=None)
        for r, p in rounds.items():
            if r < round_idx and r <= checkpointed and r != kept:
                p.unlink(missing_ok=True)


    def discard_after(self, round_idx: int) -> None:
        """Remove the states of rounds after ``round_idx``: on resume from a checkpoint
        of that round they belong to a timeline that was abandoned, and a later round
        of the new one would read them as its own."""
        for r, p in self.rounds().items():
            if r > round_idx:
                p.unlink(missing_ok=True)


class MemoryStates(dict):
    """``cid -> ClientState`` in memory; checkpoints hold every client's state."""

    def __init__(self, num_clients: int):
        super().__init__({cid: ClientState() for cid in range(num_clients)})
        self.num_clients = num_clients

    def before(self, cid: int, round_idx: int) -> ClientState:
        return self[cid]

    def after(self, cid: int, round_idx: int, state: ClientState) -> None:
        self[cid] = state

    def checkpointed(self, round_idx: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"clients": dict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        clients = state.get("clients", {})
        self.update({cid: clients.get(cid, ClientState()) for cid in range(self.num_clients)})


class DiskStates(Mapping):
    """Client states on disk, read through a small cache of recently used clients.

    ``states[cid]`` is the client's newest state (what evaluation reads);
    :meth:`before` the state a round trains from. The root is resolved at the first
    access (``root()``), so a run whose directory is only named when it starts (a
    timestamped default) still keeps its clients inside it."""

    def __init__(self, num_clients: int, root, cache_size: int = 64):
        self.num_clients, self._root, self.cache_size = num_clients, root, cache_size
        self.round = 0  # the newest round any client's state was written for
        self.saved = 0  # the newest round a checkpoint covers
        self._cache: OrderedDict[int, tuple[int, ClientState]] = OrderedDict()

    @property
    def root(self) -> Path:
        if callable(self._root):
            self._root = Path(self._root())
        return Path(self._root)

    def _folder(self, cid: int) -> ClientStateFolder:
        return ClientStateFolder(self.root / f"client-{cid}")

    def _cached(self, cid: int, at_most: int) -> ClientState:
        folder = self._folder(cid)
        hit = self._cache.get(cid)
        # the cached state is the one to read unless a later file is valid at at_most
        if hit is not None and hit[0] <= at_most and not any(
                hit[0] < r <= at_most for r in folder.rounds()):
            self._cache.move_to_end(cid)
            return hit[1]
        round_idx, state = folder.newest(at_most)
        self._remember(cid, round_idx, state)
        return state

    def _remember(self, cid: int, round_idx: int, state: ClientState) -> None:
        self._cache[cid] = (round_idx, state)
        self._cache.move_to_end(cid)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def __getitem__(self, cid: int) -> ClientState:
        if not 0 <= cid < self.num_clients:
            raise KeyError(cid)
        return self._cached(cid, self.round)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.num_clients))

    def __len__(self) -> int:
        return self.num_clients

    def before(self, cid: int, round_idx: int) -> ClientState:
        return self._cached(cid, round_idx - 1)

    def after(self, cid: int, round_idx: int, state: ClientState) -> None:
        self._folder(cid).save(round_idx, state, self.saved)
        self.round = max(self.round, round_idx)
        self._remember(cid, round_idx, state)

    def checkpointed(self, round_idx: int) -> None:
        self.saved = round_idx

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records: that the states are in the run directory's
        ``clients/`` and the round it covers (the files stay where they are, and the
        run directory may move)."""
        return {"disk": FOLDER, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "disk" not in state:
            raise ConfigError("this checkpoint holds the client states itself (memory "
                              "store); resume it with clients.state_store=memory")
        self.round = self.saved = int(state["round"])
        self._cache.clear()
        if self.root.is_dir():  # a resume: what was written after the checkpoint is void
            for folder in self.root.glob("client-*"):
                ClientStateFolder(folder).discard_after(self.saved)


def client_states(cfg: ExperimentConfig) -> MemoryStates | DiskStates:
    """The store ``clients.state_store`` asks for (``auto``: disk above
    ``clients.state_store_threshold`` clients). A named ``output_dir`` is checked for
    writing now, before the run starts."""
    from sfedlora.runtime.results import resolve_output_dir

    clients = cfg.clients
    disk = clients.state_store == "disk" or (
        clients.state_store == "auto" and clients.num > clients.state_store_threshold)
    if not disk:
        return MemoryStates(clients.num)
    if cfg.output_dir is not None:
        check_writable(Path(cfg.output_dir) / FOLDER)
    return DiskStates(clients.num, lambda: resolve_output_dir(cfg) / FOLDER)


def check_writable(folder: Path) -> None:
    """A clear error unless ``folder`` exists as a writable directory or could be
    created (its nearest existing ancestor is one); creates nothing."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"clients.state_store=disk keeps client states in {folder}, but "
                          f"{probe} is not a writable directory; set output_dir to one")
