"""A SuperNode's state directory: its client's state per round, and what the clients of
this machine share, as safetensors under ``STATE_DIR/run-<run key>/``.

``STATE_DIR`` is ``state-dir`` in the node config, else ``$SFEDLORA_STATE_DIR``, else
``~/.cache/sfedlora/flower-state``. The run key comes with every message and is kept
in the server's checkpoint, so a resumed run finds its nodes' state again.

A client's state is written once per round it trains (``client-<id>/round-<r>``), and
read as of a round: training round r starts from the newest state before r, and
evaluation after round r reads the newest at or before r. So a round the server never
checkpointed (killed mid-way) is simply trained again from the state before it.
Files older than the newest one at or before the server's last checkpoint are removed,
and so, when a resumed server first reaches this client, are those of rounds after the
checkpoint it resumed from (:meth:`NodeState.enter_timeline`).
"""

from __future__ import annotations

import json
from pathlib import Path

from sfedlora.core.checkpoint import write_atomically
from sfedlora.core.records import ClientState
from sfedlora.core.stores import DiskStore
from sfedlora.runtime.client_states import ClientStateFolder
from sfedlora.runtime.flower.worker_channel import state_dir


def export_folder(node_config, run_key: str, cid: int) -> Path:
    """Where a node saves client ``cid``'s exported PEFT adapter: ``export-dir`` in the
    node config, else the run's state directory, under ``exports/client_<cid>``."""
    root = node_config.get("export-dir")
    base = Path(str(root)) / f"run-{run_key}" if root else state_root(node_config, run_key)
    return base / "exports" / f"client_{cid}"


def state_root(node_config, run_key: str) -> Path:
    return state_dir(node_config) / f"run-{run_key}"


TIMELINE_FILE = "timeline.json"


class NodeState:
    def __init__(self, root: Path, cid: int):
        self.folder = root / f"client-{cid}"
        self.states = ClientStateFolder(self.folder)
        self.shared = DiskStore(root / "shared")

    def enter_timeline(self, timeline: str, resumed_at: int) -> None:
        """The server process sending now is ``timeline``, continuing from its
        checkpoint of round ``resumed_at``. When that is new to this client, the states
        it wrote after ``resumed_at`` for an earlier process (killed before its next
        checkpoint) are removed: the new timeline would otherwise read them as its own
        in a round this client does not train again."""
        marker = self.folder / TIMELINE_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("timeline") == timeline:
            return
        self.states.discard_after(resumed_at)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(marker, json.dumps({"timeline": timeline,
                                             "resumed_at": resumed_at}).encode())

    def load(self, at_most: int) -> ClientState:
        """The state after the newest round <= ``at_most`` this client trained (fresh
        if none)."""
        return self.states.load(at_most)

    def save(self, round_idx: int, state: ClientState, checkpointed: int) -> None:
        self.states.save(round_idx, state, checkpointed)

    # --- client stages' sessions (their round's secrets): one round at a time -------

    def _session_path(self, stage: str, round_idx: int) -> Path:
        return self.folder / f"{stage}-round-{round_idx}.json"

    def load_session(self, stage: str, round_idx: int) -> dict | None:
        path = self._session_path(stage, round_idx)
        return json.loads(path.read_text()) if path.is_file() else None

    def save_session(self, stage: str, round_idx: int, state: dict | None) -> None:
        """Keep (owner-only, atomically) or, with None, delete this round's session of
        client stage ``stage``; a session of that stage left by an earlier round this
        client dropped out of is deleted."""
        path = self._session_path(stage, round_idx)
        for old in self.folder.glob(f"{stage}-round-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
        if state is None:
            path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(state).encode(), mode=0o600)
