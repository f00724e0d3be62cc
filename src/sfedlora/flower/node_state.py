"""A SuperNode's state directory: its client's state per round, and what the clients of
this machine share, as safetensors under ``STATE_DIR/run-<run key>/``.

``STATE_DIR`` is ``state-dir`` in the node config, else ``$SFEDLORA_STATE_DIR``, else
``~/.cache/sfedlora/flower-state``. The run key comes with every message and is kept
in the server's checkpoint, so a resumed run finds its nodes' state again.

A client's state is written once per round it trains (``client-<id>/round-<r>``), and
read as of a round: training round r starts from the newest state before r, and
evaluation after round r reads the newest at or before r. So a round the server never
checkpointed (killed mid-way) is simply trained again from the state before it.
Files older than the newest one at or before the server's last checkpoint are removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sfedlora.client_states import ClientStateFolder
from sfedlora.records import ClientState
from sfedlora.stores import DiskStore


def state_root(node_config, run_key: str) -> Path:
    root = (node_config.get("state-dir") or os.environ.get("SFEDLORA_STATE_DIR")
            or Path.home() / ".cache" / "sfedlora" / "flower-state")
    return Path(str(root)) / f"run-{run_key}"


class NodeState:
    def __init__(self, root: Path, cid: int):
        self.folder = root / f"client-{cid}"
        self.states = ClientStateFolder(self.folder)
        self.shared = DiskStore(root / "shared")

    def load(self, at_most: int) -> ClientState:
        """The state after the newest round <= ``at_most`` this client trained (fresh
        if none)."""
        return self.states.load(at_most)

    def save(self, round_idx: int, state: ClientState, checkpointed: int) -> None:
        self.states.save(round_idx, state, checkpointed)

    # --- secure aggregation: the round's secrets, only between its exchanges ----------

    def _secure_path(self, round_idx: int) -> Path:
        return self.folder / f"secagg-round-{round_idx}.json"

    def load_secure(self, round_idx: int) -> dict | None:
        path = self._secure_path(round_idx)
        return json.loads(path.read_text()) if path.is_file() else None

    def save_secure(self, round_idx: int, state: dict | None) -> None:
        """Keep (owner-only, atomically) or, with None, delete this round's session;
        a session left by an earlier round this client dropped out of is deleted."""
        path = self._secure_path(round_idx)
        for old in self.folder.glob("secagg-round-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
        if state is None:
            path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
