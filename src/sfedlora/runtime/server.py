"""Server-side execution: hold the global state, check and combine uploads.

The combining rule is the method's (:meth:`Method.aggregate`); the server adds what
any method needs: encoding the download, size limits before anything is parsed,
decoding (safetensors only, never pickle), an optional server optimizer, rejecting
malformed updates with a logged reason, optional clipping, robust combiners and
differential-privacy noise, and skipping a round that has fewer than ``min_clients``
good updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from sfedlora.aggregation.combiners import clip_update, combiner_for, update_norm
from sfedlora.aggregation.fedopt import ServerOptimizer
from sfedlora.comm.downlink import Downlink
from sfedlora.core import codecs, wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.codecs import Codec
from sfedlora.core.ranks import pad, truncate, truncated_spec
from sfedlora.core.records import AggregationReport
from sfedlora.methods import Method, Part, Update
from sfedlora.methods.base import ServerStage
from sfedlora.privacy.dp import GaussianMechanism
from sfedlora.settings import ServerConfig

log = logging.getLogger(__name__)

HEADER_ALLOWANCE = 64 * 1024  # bytes of safetensors header/metadata an honest upload may carry


class UpdateRejected(ValueError):
    """An upload that fails a check; the message is the reason that gets logged."""


@dataclass(frozen=True)
class Reply:
    client_id: int
    num_examples: int
    payload: bytes


class Server:
    def __init__(
        self,
        method: Method,
        state: dict[str, torch.Tensor],
        spec: dict[str, TensorSpec],
        names_for: Callable[[Iterable[Part]], list[str]],
        cfg: ServerConfig | None = None,
        min_clients: int = 1,
        privacy: GaussianMechanism | None = None,
        down: Codec | None = None,
        optimizer: str = "none",
        ranks: Sequence[int] | None = None,
        client_start: Callable[[int, int], dict[str, torch.Tensor]] | None = None,
        stage: ServerStage | None = None,
        down_history: int = 16,
        down_origin: dict[str, torch.Tensor] | None = None,
    ):
        """``names_for(parts)`` lists the tensor names of those parts (the model's
        layout); ``spec`` gives every adapter tensor's shape and dtype; ``down`` encodes
        the download; ``optimizer`` names the server optimizer (``"none"``: replace);
        ``ranks`` gives each client's rank where ranks are mixed (:mod:`sfedlora.core.ranks`);
        ``stage`` the method's server stage (default: none);
        ``client_start(cid, round)`` the adapter a client starts a round from before its
        download (its own A draw where A is independent or fresh, B zero): what changes
        to tensors the server never sent are measured against. A ``down`` codec with
        ``delta`` sends each client the change since what it holds
        (:mod:`sfedlora.comm.downlink`, ``down_history`` versions kept, ``down_origin``
        its version 0, default ``state``)."""
        self.spec, self.method = spec, method
        self.state = state
        self.names_for, self.min_clients = names_for, min_clients
        self.cfg = cfg or ServerConfig()
        self.privacy = privacy
        self.down = down or Codec()
        self.ranks = list(ranks) if ranks is not None else None
        self.client_start = client_start
        self.stage = stage or ServerStage()
        self.downlink = (Downlink(self.down, down_history, state, down_origin)
                         if self.down.delta else None)
        shared = names_for(method.roles.shared - method.roles.fixed)
        self.optimizer = (None if optimizer == "none"
                          else ServerOptimizer(optimizer, self.cfg, spec, shared))

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self._state

    def state_dict(self) -> dict:
        """Everything a resumed server needs: the shared state, the server optimizer's
        state and the method's server-side state."""
        return {"state": self.state,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "hooks": self.stage.state_dict(),  # the key checkpoints have always had
                "downlink": self.downlink.state_dict() if self.downlink else None}

    def load_state_dict(self, saved: dict) -> None:
        self.state = saved["state"]
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.stage.load_state_dict(saved.get("hooks") or {})
        if self.downlink is not None:
            self.downlink.load_state_dict(saved["downlink"])

    @state.setter
    def state(self, value: dict[str, torch.Tensor]) -> None:
        self._state = value
        self._payloads: dict[tuple[int | None, tuple[str, ...]], bytes] = {}
        self._decoded: dict[int | None, dict[str, torch.Tensor]] = {}

    def _rank(self, cid: int | None) -> int | None:
        """The truncation rank of a client, None for the full rank."""
        if self.ranks is None or cid is None:
            return None
        return self.ranks[cid]

    def _payload(self, rank: int | None, extras: dict[str, torch.Tensor]) -> bytes:
        key = (rank, tuple(sorted(extras)))  # an extra's name says what it holds
        if key not in self._payloads:
            shared = self.state if rank is None else truncate(self.state, rank)
            self._payloads[key] = self.down.encode({**shared, **extras})
        return self._payloads[key]

    def download(self, cid: int | None = None) -> bytes:
        """The message client ``cid`` receives this round: the shared state (truncated
        to its rank where ranks are mixed), encoded, plus the method's extra tensors
        for it (FLoRA: the factors of every round it has not received yet). Uploads are
        decoded (and changes measured) relative to what the client received."""
        extras = self.stage.download_extras(cid) if cid is not None else {}
        if self.downlink is not None and cid is not None:
            return self.downlink.message(cid, extras)
        return self._payload(self._rank(cid), extras)

    def forget(self, cid: int) -> None:
        """Client ``cid`` did not reply: assume it holds no download it was sent (the
        method's stage does the same for its extras when the round ends)."""
        if self.downlink is not None:
            self.downlink.forget(cid)

    def evaluation_request(self, cid: int) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
        """What client ``cid`` is scored with now: the shared state as it would receive
        it, and the method's extras it has not received yet (which an evaluation
        request carries without counting them as received)."""
        return self.received_state(cid), self.stage.download_extras(cid, advance=False)

    def _received(self, cid: int | None) -> dict[str, torch.Tensor]:
        """The shared state as client ``cid`` decodes it (truncated to its rank)."""
        if self.downlink is not None:  # every client holds the published state
            return self.downlink.published
        rank = self._rank(cid)
        if rank not in self._decoded:
            self._decoded[rank] = codecs.decode(self._payload(rank, {}))
        return self._decoded[rank]

    @property
    def sent(self) -> dict[str, torch.Tensor]:
        """What full-rank clients receive this round."""
        return self._received(None)

    def reference(self, cid: int | None, round_idx: int) -> dict[str, torch.Tensor]:
        """What client ``cid`` started round ``round_idx`` from, at full shape (zero
        beyond its rank): what it received, and for the tensors it was not sent (its
        own first A, FLoRA's fresh factors) the values it drew itself. Norm bounds and
        clipping measure its change against this, never against zero."""
        received = self.sent if self._rank(cid) is None else pad(self._received(cid),
                                                                 self.spec)
        if cid is None or self.client_start is None:
            return received
        own = self.client_start(cid, round_idx)
        return {**{n: t for n, t in own.items() if n not in received}, **received}

    def received_state(self, cid: int | None = None) -> dict[str, torch.Tensor]:
        """The shared state as client ``cid`` (or a full-rank client) would receive it
        now (the masked or quantised model where the download is lossy, truncated to
        its rank): what evaluation and export use."""
        if self.down.plain and self._rank(cid) is None and self.downlink is None:
            return self.state
        return pad(self._received(cid), self.spec)

    def _byte_limit(self, expected: set[str]) -> int:
        """The largest payload an honest client can send: dense float32 values, plus a
        bitmap and a scale and zero point per row for the compressed encodings."""
        if self.cfg.max_update_bytes is not None:
            return self.cfg.max_update_bytes
        payload = 0
        for name in expected:
            shape, dtype = self.spec[name]
            numel = math.prod(shape)
            payload += numel * dtype.itemsize + numel // 8 + 1 + 8 * (shape[0] if shape else 1)
        return payload + HEADER_ALLOWANCE

    def check(self, reply: Reply, expected: set[str], round_idx: int) -> Update:
        """Decode one reply; raise :class:`UpdateRejected` with the reason if it is bad."""
        if reply.num_examples == 0:
            raise UpdateRejected("the client holds no training examples (its partition "
                                 "is empty)")
        if not isinstance(reply.num_examples, int) or reply.num_examples <= 0:
            raise UpdateRejected(f"num_examples={reply.num_examples!r} must be a positive int")
        limit = self._byte_limit(expected)
        if len(reply.payload) > limit:
            raise UpdateRejected(f"payload of {len(reply.payload)} bytes exceeds {limit}")
        # A client of lower rank sends (and received) truncated tensors: check those
        # shapes, then zero-pad to the server's.
        rank = self._rank(reply.client_id)
        spec = self.spec if rank is None else truncated_spec(self.spec, rank)
        received = self._received(reply.client_id)
        try:
            tensors, present = codecs.decode_with_presence(reply.payload, reference=received,
                                                           spec=spec)
        except wire.MessageError as exc:
            raise UpdateRejected(str(exc)) from None
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise UpdateRejected(
                f"unexpected tensor names (missing {missing[:3]}, extra {extra[:3]})"
            )
        for name, t in tensors.items():
            want = spec[name]
            if tuple(t.shape) != want.shape:
                of_rank = "" if rank is None else f" (client rank {rank})"
                raise UpdateRejected(f"{name}: shape {tuple(t.shape)} != {want.shape}{of_rank}")
            if t.dtype != want.dtype:
                raise UpdateRejected(f"{name}: dtype {t.dtype} != {want.dtype}")
            if not torch.isfinite(t).all():
                raise UpdateRejected(f"{name}: non-finite values")
        if rank is not None:  # the components beyond its rank were never sent
            present = pad({n: present.get(n, torch.ones_like(t, dtype=torch.bool))
                           for n, t in tensors.items()}, self.spec)
        tensors = pad(tensors, self.spec)
        if self.cfg.max_update_norm is not None:
            norm = update_norm(tensors, self.reference(reply.client_id, round_idx))
            if norm > self.cfg.max_update_norm:
                raise UpdateRejected(
                    f"update norm {norm:.4g} exceeds server.max_update_norm="
                    f"{self.cfg.max_update_norm}"
                )
        # server.weighting=uniform: every client counts as one example
        weight = 1 if self.cfg.weighting == "uniform" else reply.num_examples
        return Update(reply.client_id, weight, self._on_global(tensors), present)

    def _on_global(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With delta downloads a client trained from the published state P, which lags
        the global state G by what the download codec has not sent yet. Its update is
        carried onto G (``G + (x - P)``), so that lag survives aggregation and goes out
        in later downloads; combined from P, every round would drop it for good."""
        if self.downlink is None:
            return tensors
        held = self.downlink.published
        return {n: self.state[n] + (t - held[n]) if n in self.state and n in held else t
                for n, t in tensors.items()}

    def aggregate(self, round_idx: int, replies: list[Reply]) -> AggregationReport:
        expected = set(self.names_for(self.method.plan(round_idx).upload))
        report, updates = AggregationReport(), []
        for reply in sorted(replies, key=lambda r: r.client_id):
            try:
                updates.append(self.check(reply, expected, round_idx))
                report.accepted.append(reply.client_id)
            except UpdateRejected as exc:
                report.rejected[reply.client_id] = str(exc)
                # under DP who took part is secret, and run.log is released with the run
                who = "a client" if self.privacy else f"client {reply.client_id}"
                log.warning("round %d: rejected update of %s: %s", round_idx, who, exc)
        if self.privacy is not None:  # released every round, however few took part
            self._set_combined(self._private_step(round_idx, updates, sorted(expected)))
            report.applied = True
            return report
        if len(updates) < self.min_clients:
            log.warning("round %d: %d good updates < min_clients=%d; global state unchanged",
                        round_idx, len(updates), self.min_clients)
            return report
        self._set_combined(self._combine(round_idx, updates))
        report.applied = True
        return report

    def _set_combined(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        if self.downlink is not None:
            self.downlink.publish(state)

    def apply_mean(self, round_idx: int, mean: dict[str, torch.Tensor], weight: int,
                   clients: Sequence[int]) -> None:
        """Apply the weighted mean of the uploads of ``clients`` that an upload stage
        unmasked (the server never saw them one by one): as one update of weight 1, or
        under DP as the noised sum of their changes (the clients clipped their own)."""
        if self.privacy is not None:
            # sum of changes = sum of uploads - sum of what each client started from
            starts = [self.reference(c, round_idx) for c in clients]
            change_sum = {n: mean[n].double() * len(clients)
                          - sum(s[n].double() for s in starts) for n in mean}
            self._set_combined(self._release(round_idx, change_sum, []))
            return
        update = Update(-1, max(1, weight), mean)
        self._set_combined(self._combine(round_idx, [update]))

    def _private_step(self, round_idx: int, updates: list[Update], names: list[str]
                      ) -> dict[str, torch.Tensor]:
        """DP: each change clipped to C against what its client started from, summed,
        noised and divided by the expected cohort size (:class:`GaussianMechanism`)."""
        change_sum = {n: torch.zeros(self.spec[n].shape, dtype=torch.float64) for n in names}
        clip = self.privacy.cfg.clip_norm
        for u in sorted(updates, key=lambda u: u.client_id):
            start = self._on_global(self.reference(u.client_id, round_idx))
            clipped = clip_update(u.tensors, start, clip)
            for n in names:
                change_sum[n] += clipped[n].double() - start[n].double()
        return self._release(round_idx, change_sum, updates)

    def _release(self, round_idx: int, change_sum: dict[str, torch.Tensor],
                 updates: list[Update]) -> dict[str, torch.Tensor]:
        """The noised release on the state a full-rank client started from (never on
        who took part), then the method's post-processing and the server optimizer."""
        base = self._on_global(self.sent)
        new = {**self.state, **self.privacy.release(base, change_sum)}
        return self._finish(round_idx, new, updates, sorted(change_sum))

    def _combine(self, round_idx: int, updates: list[Update]) -> dict[str, torch.Tensor]:
        clip = self.cfg.clip_norm
        if clip is not None and updates[0].client_id >= 0:  # -1: an unmasked sum, unclippable
            updates = [replace(u, tensors=clip_update(  # on the frame updates are in
                u.tensors, self._on_global(self.reference(u.client_id, round_idx)), clip))
                for u in updates]
        new = self.method.aggregate(self.state, updates, combiner_for(self.cfg))
        return self._finish(round_idx, new, updates, list(updates[0].tensors))

    def _finish(self, round_idx: int, new: dict[str, torch.Tensor], updates: list[Update],
                uploaded: list[str]) -> dict[str, torch.Tensor]:
        new = self.stage.after_combine(round_idx, new,
                                       sorted(updates, key=lambda u: u.client_id))
        if self.optimizer is None:
            return new
        return self.optimizer.step(self.state, self.sent, {n: new[n] for n in uploaded})
