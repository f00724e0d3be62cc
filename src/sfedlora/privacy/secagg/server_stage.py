"""Secure aggregation's server stage: the round's uploads, driven through any pool.

:class:`SecureUploads` (an :class:`~sfedlora.core.stages.UploadStage`) runs the exchanges
of :mod:`sfedlora.privacy.secagg.protocol` through the pool's generic ``exchange``
(advertise, share and unmask; the mask request rides with the training download as the
request the client stage answers after its fit), counts every byte each client sends
and receives, and hands the unmasked weighted mean to the server (its ``apply_mean``),
which adds DP noise where configured and applies it as if it had averaged the uploads
itself. Below the threshold at any exchange the round is skipped with a logged reason.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

import sfedlora.privacy.secagg.field as fieldmath
from sfedlora.core import wire
from sfedlora.core.records import AggregationReport, FitResult, StageRequest
from sfedlora.core.stages import Uploaded
from sfedlora.privacy.secagg import messages as sm
from sfedlora.privacy.secagg.client import weight_bound
from sfedlora.privacy.secagg.protocol import RoundAborted, RoundParams, ServerSession
from sfedlora.settings import ExperimentConfig

log = logging.getLogger(__name__)

STAGE = "secagg"  # the client stage that answers (sfedlora.privacy.stages)


def threshold(cfg: ExperimentConfig, clients: int) -> int:
    """Shares needed to unmask: the configured fraction of the round's clients, and
    never less than a strict majority (floor(n/2) + 1) or 2. Below a strict majority a
    lying server could show two disjoint groups of t clients different survivor lists
    and collect both kinds of share of one client (the split-survivor attack)."""
    return max(2, clients // 2 + 1, math.ceil(cfg.privacy.secagg_threshold * clients))


@dataclass
class Exchange:
    """A round in progress: the server's session and the protocol's bytes per client."""

    session: ServerSession | None
    routed: dict = field(default_factory=dict)  # each client's share ciphertexts
    up: Counter = field(default_factory=Counter)
    down: Counter = field(default_factory=Counter)
    aborted: str | None = None


class SecureUploads:
    """``server`` is the runtime's server (its method, spec, ``names_for``,
    ``min_clients``, ``privacy`` and ``apply_mean``); ``pool`` any client pool."""

    def __init__(self, cfg: ExperimentConfig, server, pool):
        self.cfg, self.server, self.pool = cfg, server, pool
        self.last_error_bound: float | None = None  # of the last aggregated round
        self._round: Exchange | None = None  # between fit and aggregate

    def _send(self, ex: Exchange, round_idx: int, stage: str, requests: dict[int, bytes]
              ) -> dict[int, bytes]:
        for c, body in requests.items():
            ex.down[c] += len(body)
        replies = self.pool.exchange(round_idx, {c: StageRequest(STAGE, stage, body)
                                                 for c, body in requests.items()})
        for c, body in replies.items():
            ex.up[c] += len(body)
        return replies

    def fit(self, round_idx: int, downloads: dict[int, bytes]) -> dict[int, FitResult]:
        """Advertise and share keys, then train the clients that shared, each masking
        its upload. Returns the fits (uploads are masked vectors)."""
        self._round = ex = self._open(round_idx, downloads)
        if ex.aborted is not None:
            return {}
        masks = {c: sm.dumps({"received": {str(s): ct for s, ct in ex.routed[c].items()},
                              "u2": ex.session.u2}) for c in ex.session.u2}
        for c, body in masks.items():
            ex.down[c] += len(body) + len(downloads[c])
        fits = self.pool.fit(round_idx, {c: downloads[c] for c in ex.session.u2},
                             then={c: StageRequest(STAGE, sm.MASK, body)
                                   for c, body in masks.items()})
        for c, fit in fits.items():
            ex.up[c] += len(fit.upload)
        return fits

    def _open(self, round_idx: int, downloads: dict[int, bytes]) -> Exchange:
        """The advertise and share exchanges (aborted: too few replied)."""
        clients = sorted(downloads)
        privacy = self.cfg.privacy
        params = RoundParams(round_idx, threshold(self.cfg, len(clients)),
                             self.step(len(clients)), privacy.secagg_range,
                             self.weight_step(len(clients)))
        ex = Exchange(ServerSession(params, clients))
        try:
            replies = self._send(ex, round_idx, sm.ADVERTISE,
                                 {c: sm.dumps({"params": params.to_json()}) for c in clients})
            keys = ex.session.keys({c: sm.loads(r) for c, r in replies.items()})
            request = sm.dumps({"keys": {str(c): k for c, k in keys.items()}})
            replies = self._send(ex, round_idx, sm.SHARE, {c: request for c in keys})
            ex.routed = ex.session.route({c: sm.int_keys(sm.loads(r))
                                          for c, r in replies.items()})
        except (RoundAborted, wire.MessageError) as exc:
            ex.aborted = str(exc)
        return ex

    def aggregate(self, round_idx: int, fits: dict[int, FitResult]) -> Uploaded:
        ex, self._round = self._round, None
        report = AggregationReport()
        if ex.aborted is None:
            try:
                mean, weight = self._unmask(round_idx, ex, fits, report)
                self.server.apply_mean(round_idx, mean, weight, report.accepted)
                report.applied = True
            except RoundAborted as exc:
                ex.aborted = str(exc)
        if ex.aborted is not None:
            report.accepted = []
            log.warning("round %d: secure aggregation skipped the round (%s); global state "
                        "unchanged", round_idx, ex.aborted)
        return Uploaded(report, dict(sorted(ex.up.items())), dict(sorted(ex.down.items())))

    def _unmask(self, round_idx: int, ex: Exchange, fits: dict, report: AggregationReport
                ) -> tuple[dict[str, torch.Tensor], int]:
        server = self.server
        names = sorted(server.names_for(server.method.plan(round_idx).upload))
        size = sum(math.prod(server.spec[n].shape) for n in names) + 1
        masked = {}
        for c, fit in sorted(fits.items()):
            try:
                masked[c] = sm.decode_masked(fit.upload, size)
            except wire.MessageError as exc:  # its masks are removed as for a dropout
                report.rejected[c] = str(exc)
                log.warning("round %d: rejected masked update of %s: %s", round_idx,
                            self._who(c), exc)
        survivors = ex.session.collect(masked)
        if len(survivors) < server.min_clients:  # before any share of the sum is revealed
            raise RoundAborted(f"{len(survivors)} masked uploads < clients.min_clients="
                               f"{server.min_clients}")
        request = sm.dumps({"survivors": survivors})
        replies = self._send(ex, round_idx, sm.UNMASK, {c: request for c in survivors})
        reveals = {}
        for c, body in replies.items():
            try:
                reveal = sm.loads(body)
                reveals[c] = {kind: sm.int_keys(reveal.get(kind, {})) for kind in ("b", "sk")}
            except (wire.MessageError, AttributeError) as exc:
                log.warning("round %d: shares of %s are unreadable: %s", round_idx,
                            self._who(c), exc)
        total = ex.session.unmask(reveals)
        params = ex.session.params
        weight = float(total[-1]) * params.weight_step
        if weight <= 0:
            raise RoundAborted(f"the clients' weights sum to {weight}")
        report.accepted = survivors
        self.last_error_bound = fieldmath.mean_error(len(survivors), params.step,
                                                     params.weight_step, params.value_range,
                                                     weight)
        values = total[:-1].astype(np.float64) * params.step / weight
        mean, offset = {}, 0
        for n in names:
            shape, dtype = server.spec[n]
            count = math.prod(shape)
            mean[n] = torch.from_numpy(values[offset:offset + count].reshape(shape)).to(dtype)
            offset += count
        return mean, weight

    def _who(self, cid: int) -> str:
        """A client as run.log names it: not at all under DP, where who took part is
        secret from the released artefacts."""
        return "a client" if self.server.privacy is not None else f"client {cid}"

    def error_bound(self, clients: int) -> float:
        """For integer weights, the largest difference per coordinate between the
        secure weighted mean and the plain one of the same (in-range) uploads, whatever
        the weights: half a step (:func:`~sfedlora.privacy.secagg.field.mean_error` with the
        weights' sum at its smallest, one per client). With real weights (HetLoRA) the
        bound depends on their sum: see ``last_error_bound``."""
        return fieldmath.mean_error(clients, self.step(clients), 1.0, 0.0, clients)

    def step(self, clients: int) -> float:
        """The quantisation step of a round of ``clients`` clients (public)."""
        bound = weight_bound(self.cfg, self.server.method)
        return fieldmath.step_for(self.cfg.privacy.secagg_range, int(bound), clients)

    def weight_step(self, clients: int) -> float:
        """1 for integer weights (summed exactly); else the step that keeps the sum of
        ``clients`` weights up to ``privacy.secagg_max_weight`` inside 32 bits."""
        if self.cfg.privacy.enabled or self.server.method.traits.integer_weights:
            return 1.0
        return fieldmath.step_for(weight_bound(self.cfg, self.server.method), 1, clients)
