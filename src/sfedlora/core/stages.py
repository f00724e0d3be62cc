"""The two kinds of stage that a runtime runs without knowing what they do.

A *client stage* answers :class:`~sfedlora.core.records.StageRequest` messages on the
client, keeping a small JSON-able session between them (the in-process pool keeps it in
memory, a Flower node in its state directory). An *upload stage* is the server's side
of a round's uploads: it asks the pool to train the round's clients, and turns their
replies into the new global state. The plain one (:class:`sfedlora.runtime.uploads.
PlainUploads`) decodes, checks and combines each upload; secure aggregation's
(:mod:`sfedlora.privacy.secagg.server_stage`) runs its key exchanges around the fit and
hands the server only the unmasked sum. Which one a run uses is chosen by
:func:`sfedlora.privacy.stages.upload_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sfedlora.core.records import AggregationReport, FitResult, StageRequest

Session = dict[str, Any] | None


class ClientStage(Protocol):
    def exchange(self, session: Session, cid: int, request: StageRequest
                 ) -> tuple[Session, bytes]:
        """Answer one request of client ``cid``: the new session and the reply."""

    def after_fit(self, worker: Any, cid: int, round_idx: int, download: bytes,
                  fit: FitResult, session: Session, request: StageRequest
                  ) -> tuple[Session, FitResult]:
        """What client ``cid`` sends instead of ``fit`` (trained on ``download``). The
        runtime then sends no fit metrics beside it: whatever the stage keeps out of
        the returned fit stays on the client."""


@dataclass
class Uploaded:
    """A round's uploads once the server has used them: what became of them, and the
    bytes each client sent and received for them (downloads and any exchanges)."""

    report: AggregationReport
    up: dict[int, int]
    down: dict[int, int]


class UploadStage(Protocol):
    def fit(self, round_idx: int, downloads: dict[int, bytes]) -> dict[int, FitResult]:
        """Train the round's clients on their downloads; a client missing from the
        result dropped out."""

    def aggregate(self, round_idx: int, fits: dict[int, FitResult]) -> Uploaded:
        """Turn the replies of :meth:`fit` into the server's new state."""
