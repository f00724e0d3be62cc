"""Traffic accounting: the bytes of every message as serialised, per round, per client
and in total (what ``metrics.jsonl`` reports and checkpoints carry)."""

from __future__ import annotations

from typing import Any

from sfedlora.core.records import Metric


class ByteCounter:
    def __init__(self, num_clients: int):
        self.up_total = 0
        self.down_total = 0
        self.per_client = {cid: {"up": 0, "down": 0} for cid in range(num_clients)}

    def record(self, up: dict[int, int], down: dict[int, int]) -> dict[str, Any]:
        """Count one round (``up``: the clients that replied; ``down``: every download
        sent) and return its metrics."""
        self.up_total += sum(up.values())
        self.down_total += sum(down.values())
        for c in up:
            self.per_client[c]["up"] += up[c]
            self.per_client[c]["down"] += down[c]
        return {
            Metric.BYTES_UP: sum(up.values()),
            Metric.BYTES_DOWN: sum(down.values()),
            Metric.BYTES_UP_PER_CLIENT: {str(c): b for c, b in up.items()},
            Metric.BYTES_DOWN_PER_CLIENT: {str(c): b for c, b in down.items()},
            Metric.BYTES_UP_TOTAL: self.up_total,
            Metric.BYTES_DOWN_TOTAL: self.down_total,
            Metric.BYTES_TOTAL: self.up_total + self.down_total,
            Metric.BYTES_UP_TOTAL_PER_CLIENT: {str(c): b["up"]
                                               for c, b in self.per_client.items()},
            Metric.BYTES_DOWN_TOTAL_PER_CLIENT: {str(c): b["down"]
                                                 for c, b in self.per_client.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"bytes_up": self.up_total, "bytes_down": self.down_total,
                "per_client": {str(c): b for c, b in self.per_client.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.up_total = int(state["bytes_up"])
        self.down_total = int(state["bytes_down"])
        self.per_client = {int(c): {k: int(v) for k, v in b.items()}
                           for c, b in state["per_client"].items()}
