"""The plain upload stage: every client's upload reaches the server, which decodes,
checks and combines it (:meth:`sfedlora.runtime.server.Server.aggregate`). The round
loop uses it unless the privacy layer supplies another
(:func:`sfedlora.privacy.stages.upload_stage`)."""

from __future__ import annotations

from sfedlora.core.records import FitResult
from sfedlora.core.stages import Uploaded
from sfedlora.runtime.server import Reply, Server


class PlainUploads:
    def __init__(self, server: Server, pool):
        self.server, self.pool = server, pool
        self._down: dict[int, int] = {}  # download sizes, between fit and aggregate

    def fit(self, round_idx: int, downloads: dict[int, bytes]) -> dict[int, FitResult]:
        self._down = {c: len(d) for c, d in downloads.items()}
        return self.pool.fit(round_idx, downloads)

    def aggregate(self, round_idx: int, fits: dict[int, FitResult]) -> Uploaded:
        clients = list(fits)  # the round's order
        report = self.server.aggregate(
            round_idx, [Reply(c, fits[c].num_examples, fits[c].upload) for c in clients])
        return Uploaded(report, {c: len(fits[c].upload) for c in clients}, self._down)
