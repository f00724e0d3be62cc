"""The server's round, as a pipeline of stages over the uploads.

1. **Decode and check** each upload (:class:`~sfedlora.runtime.checks.UpdateChecks`):
   size limits before anything is parsed, safetensors only (never pickle), the
   round's names, shapes and dtypes, finite values, an optional norm bound; a bad
   upload is rejected with a logged reason and the round goes on.
2. **Reduce** the good updates to the combined state: with client-level DP, each
   change clipped against what its client started from, summed and noised
   (:class:`~sfedlora.privacy.dp.GaussianMechanism`), released every round however few
   took part; otherwise, after optional clipping (``server.clip_norm``), the method's
   combining rule (:meth:`Method.aggregate`) with the configured combiner (mean,
   median, trimmed mean), skipped below ``min_clients`` good updates. An upload stage
   that sees only the sum of the uploads hands their mean in through
   :meth:`Server.apply_mean`.
3. **Finish**: the method's server stage (``after_combine``: FedSVD's
   re-factorisation, FLoRA's merge record), then the server optimizer where one is set
   (the mean change as its gradient: FedOpt).
4. **Publish** the new state as the next downloads
   (:class:`~sfedlora.runtime.downloads.Downloads`).

:func:`build_server` assembles these from settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch

from sfedlora.aggregation.combiners import clip_update, combiner_for
from sfedlora.aggregation.fedopt import ServerOptimizer
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.codecs import Codec
from sfedlora.core.records import AggregationReport
from sfedlora.methods import Method, Part, Update
from sfedlora.methods.base import ServerStage
from sfedlora.privacy.dp import GaussianMechanism
from sfedlora.runtime.checks import Reply, UpdateChecks, UpdateRejected
from sfedlora.runtime.downloads import Downloads
from sfedlora.settings import ServerConfig

__all__ = ["Reply", "Server", "UpdateRejected", "build_server"]

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


class Server:
    def __init__(self, method: Method, downloads: Downloads,
                 names_for: Callable[[Iterable[Part]], list[str]],
                 cfg: ServerConfig | None = None, min_clients: int = 1,
                 privacy: GaussianMechanism | None = None,
                 optimizer: ServerOptimizer | None = None):
        """``downloads`` holds the global state and publishes it (its server stage is
        the method's); ``names_for(parts)`` lists the tensor names of those parts (the
        model's layout); ``privacy`` the DP release; ``optimizer`` the server optimizer
        (None: the combined state replaces the global one)."""
        self.method, self.downloads, self.names_for = method, downloads, names_for
        self.cfg = cfg or ServerConfig()
        self.min_clients, self.privacy, self.optimizer = min_clients, privacy, optimizer
        self.checks = UpdateChecks(downloads.spec, self.cfg, downloads)

    # --- the state and what it publishes ------------------------------------------------

    @property
    def state(self) -> Tensors:
        return self.downloads.state

    @state.setter
    def state(self, value: Tensors) -> None:
        self.downloads.reset(value)

    @property
    def stage(self) -> ServerStage:
        """The method's server stage (an offline study may put its own in place)."""
        return self.downloads.stage

    @stage.setter
    def stage(self, value: ServerStage) -> None:
        self.downloads.stage = value

    @property
    def spec(self) -> dict[str, TensorSpec]:
        return self.downloads.spec

    @property
    def downlink(self):
        return self.downloads.downlink

    @property
    def sent(self) -> Tensors:
        return self.downloads.sent

    def download(self, cid: int | None = None) -> bytes:
        """The message client ``cid`` receives this round (see :class:`Downloads`).
        Uploads are decoded (and changes measured) relative to what it received."""
        return self.downloads.message(cid)

    def forget(self, cid: int) -> None:
        """Client ``cid`` did not reply: assume it holds no download it was sent (the
        method's stage does the same for its extras when the round ends)."""
        self.downloads.forget(cid)

    def evaluation_request(self, cid: int) -> tuple[Tensors, Tensors]:
        """What client ``cid`` is scored with now: the shared state as it would receive
        it, and the method's extras it has not received yet (which an evaluation
        request carries without counting them as received)."""
        return (self.downloads.received_state(cid),
                self.stage.download_extras(cid, advance=False))

    def received_state(self, cid: int | None = None) -> Tensors:
        return self.downloads.received_state(cid)

    def reference(self, cid: int | None, round_idx: int) -> Tensors:
        return self.downloads.reference(cid, round_idx)

    def check(self, reply: Reply, expected: set[str], round_idx: int) -> Update:
        return self.checks.check(reply, expected, round_idx)

    def state_dict(self) -> dict:
        """Everything a resumed server needs: the shared state, the server optimizer's
        state, the method's server-side state and the delta downloads' versions."""
        return {"state": self.state,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "hooks": self.stage.state_dict(),  # the key checkpoints have always had
                "downlink": self.downloads.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.state = saved["state"]
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.stage.load_state_dict(saved.get("hooks") or {})
        self.downloads.load_state_dict(saved["downlink"])

    # --- the round: check, reduce, finish, publish ----------------------------------------

    def aggregate(self, round_idx: int, replies: list[Reply]) -> AggregationReport:
        expected = set(self.names_for(self.method.plan(round_idx).upload))
        report, updates = AggregationReport(), []
        for reply in sorted(replies, key=lambda r: r.client_id):
            try:
                updates.append(self.checks.check(reply, expected, round_idx))
                report.accepted.append(reply.client_id)
            except UpdateRejected as exc:
                report.rejected[reply.client_id] = str(exc)
                # under DP who took part is secret, and run.log is released with the run
                who = "a client" if self.privacy else f"client {reply.client_id}"
                log.warning("round %d: rejected update of %s: %s", round_idx, who, exc)
        if self.privacy is not None:  # released every round, however few took part
            self._publish(self._release(round_idx, self._clipped_sum(
                round_idx, updates, sorted(expected)), updates))
            report.applied = True
            return report
        if len(updates) < self.min_clients:
            log.warning("round %d: %d good updates < min_clients=%d; global state unchanged",
                        round_idx, len(updates), self.min_clients)
            return report
        self._publish(self._combine(round_idx, updates))
        report.applied = True
        return report

    def apply_mean(self, round_idx: int, mean: Tensors, weight: int,
                   clients: Sequence[int]) -> None:
        """Apply the weighted mean of the uploads of ``clients`` that an upload stage
        unmasked (the server never saw them one by one): as one update of weight 1, or
        under DP as the noised sum of their changes (the clients clipped their own)."""
        if self.privacy is not None:
            # sum of changes = sum of uploads - sum of what each client started from
            starts = [self.reference(c, round_idx) for c in clients]
            change_sum = {n: mean[n].double() * len(clients)
                          - sum(s[n].double() for s in starts) for n in mean}
            self._publish(self._release(round_idx, change_sum, []))
            return
        update = Update(-1, max(1, weight), mean)
        self._publish(self._combine(round_idx, [update]))

    def _start(self, cid: int, round_idx: int) -> Tensors:
        """What client ``cid`` started from, on the frame its update is in."""
        return self.downloads.on_global(self.reference(cid, round_idx))

    def _clipped_sum(self, round_idx: int, updates: list[Update], names: list[str]
                     ) -> Tensors:
        """DP: each change clipped to C against what its client started from, summed."""
        ordered = sorted(updates, key=lambda u: u.client_id)
        return self.privacy.clipped_sum(
            [(u.tensors, self._start(u.client_id, round_idx)) for u in ordered], names,
            {n: self.spec[n].shape for n in names})

    def _release(self, round_idx: int, change_sum: Tensors, updates: list[Update]
                 ) -> Tensors:
        """The noised release on the state a full-rank client started from (never on
        who took part), then the finishing stages."""
        base = self.downloads.on_global(self.sent)
        new = {**self.state, **self.privacy.release(base, change_sum)}
        return self._finish(round_idx, new, updates, sorted(change_sum))

    def _combine(self, round_idx: int, updates: list[Update]) -> Tensors:
        clip = self.cfg.clip_norm
        if clip is not None and updates[0].client_id >= 0:  # -1: an unmasked sum, unclippable
            updates = [replace(u, tensors=clip_update(  # on the frame updates are in
                u.tensors, self._start(u.client_id, round_idx), clip)) for u in updates]
        new = self.method.aggregate(self.state, updates, combiner_for(self.cfg))
        return self._finish(round_idx, new, updates, list(updates[0].tensors))

    def _finish(self, round_idx: int, new: Tensors, updates: list[Update],
                uploaded: list[str]) -> Tensors:
        """The method's stage after combining (and after any DP noise: post-processing),
        then the server optimizer's step."""
        new = self.stage.after_combine(round_idx, new,
                                       sorted(updates, key=lambda u: u.client_id))
        if self.optimizer is None:
            return new
        return self.optimizer.step(self.state, self.sent, {n: new[n] for n in uploaded})

    def _publish(self, state: Tensors) -> None:
        self.downloads.publish(state)


def build_server(
    method: Method,
    state: Tensors,
    spec: dict[str, TensorSpec],
    names_for: Callable[[Iterable[Part]], list[str]],
    cfg: ServerConfig | None = None,
    min_clients: int = 1,
    privacy: GaussianMechanism | None = None,
    down: Codec | None = None,
    optimizer: str = "none",
    ranks: Sequence[int] | None = None,
    client_start: Callable[[int, int], Tensors] | None = None,
    stage: ServerStage | None = None,
    down_history: int = 16,
    down_origin: Tensors | None = None,
) -> Server:
    """A server from settings: ``spec`` every adapter tensor's shape and dtype;
    ``optimizer`` the server optimizer's name (``"none"``: replace); ``down``, ``ranks``,
    ``client_start``, ``stage``, ``down_history`` and ``down_origin`` what
    :class:`Downloads` takes."""
    cfg = cfg or ServerConfig()
    downloads = Downloads(state, spec, down, ranks, client_start, stage, down_history,
                          down_origin)
    shared = names_for(method.roles.shared - method.roles.fixed)
    step = None if optimizer == "none" else ServerOptimizer(optimizer, cfg, spec, shared)
    return Server(method, downloads, names_for, cfg, min_clients, privacy, step)
