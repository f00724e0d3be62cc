"""The server's last stage: publishing the global state as downloads.

:class:`Downloads` holds what every client receives of the server's state: encoded
once per rank (a client of lower rank receives the leading components, where ranks are
mixed: :mod:`sfedlora.core.ranks`), with the method's extra tensors for that client
(its server stage's ``download_extras``), or, with a ``delta`` download codec, the
change since the version the client holds (:mod:`sfedlora.comm.downlink`). It also
answers what a client started a round from (:meth:`Downloads.reference`), which the
server's checks, clipping and DP measure a client's change against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sfedlora.comm.downlink import Downlink
from sfedlora.core import codecs
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.codecs import Codec
from sfedlora.core.ranks import pad, truncate
from sfedlora.methods.base import ServerStage

Tensors = dict[str, torch.Tensor]


class Downloads:
    def __init__(self, state: Tensors, spec: dict[str, TensorSpec], down: Codec | None = None,
                 ranks: Sequence[int] | None = None,
                 client_start: Callable[[int, int], Tensors] | None = None,
                 stage: ServerStage | None = None, history: int = 16,
                 origin: Tensors | None = None):
        """``down`` encodes the download; ``ranks`` gives each client's rank where
        ranks are mixed; ``client_start(cid, round)`` the adapter a client starts a
        round from before its download (its own A draw where A is independent or fresh,
        B zero): what changes to tensors the server never sent are measured against;
        ``stage`` the method's server stage (its extra tensors). A ``down`` codec with
        ``delta`` keeps ``history`` published versions, ``origin`` its version 0
        (default ``state``)."""
        self.spec = spec
        self.down = down or Codec()
        self.ranks = list(ranks) if ranks is not None else None
        self.client_start = client_start
        self.stage = stage or ServerStage()
        self.reset(state)
        self.downlink = (Downlink(self.down, history, state, origin)
                         if self.down.delta else None)

    def reset(self, state: Tensors) -> None:
        """The server's state is now ``state`` (messages are encoded afresh)."""
        self.state = state
        self._payloads: dict[tuple[int | None, tuple[str, ...]], bytes] = {}
        self._decoded: dict[int | None, Tensors] = {}

    def publish(self, state: Tensors) -> None:
        """A new global state that clients receive from now on."""
        self.reset(state)
        if self.downlink is not None:
            self.downlink.publish(state)

    def rank(self, cid: int | None) -> int | None:
        """The truncation rank of a client, None for the full rank."""
        if self.ranks is None or cid is None:
            return None
        return self.ranks[cid]

    def _payload(self, rank: int | None, extras: Tensors) -> bytes:
        key = (rank, tuple(sorted(extras)))  # an extra's name says what it holds
        if key not in self._payloads:
            shared = self.state if rank is None else truncate(self.state, rank)
            self._payloads[key] = self.down.encode({**shared, **extras})
        return self._payloads[key]

    def message(self, cid: int | None = None) -> bytes:
        """The message client ``cid`` receives this round: the shared state (truncated
        to its rank where ranks are mixed), encoded, plus the method's extra tensors
        for it (FLoRA: the factors of every round it has not received yet)."""
        extras = self.stage.download_extras(cid) if cid is not None else {}
        if self.downlink is not None and cid is not None:
            return self.downlink.message(cid, extras)
        return self._payload(self.rank(cid), extras)

    def forget(self, cid: int) -> None:
        """Client ``cid`` did not reply: assume it holds no download it was sent."""
        if self.downlink is not None:
            self.downlink.forget(cid)

    def received(self, cid: int | None) -> Tensors:
        """The shared state as client ``cid`` decodes it (truncated to its rank)."""
        if self.downlink is not None:  # every client holds the published state
            return self.downlink.published
        rank = self.rank(cid)
        if rank not in self._decoded:
            self._decoded[rank] = codecs.decode(self._payload(rank, {}))
        return self._decoded[rank]

    @property
    def sent(self) -> Tensors:
        """What full-rank clients receive this round."""
        return self.received(None)

    def reference(self, cid: int | None, round_idx: int) -> Tensors:
        """What client ``cid`` started round ``round_idx`` from, at full shape (zero
        beyond its rank): what it received, and for the tensors it was not sent (its
        own first A, FLoRA's fresh factors) the values it drew itself. Norm bounds and
        clipping measure its change against this, never against zero."""
        received = self.sent if self.rank(cid) is None else pad(self.received(cid),
                                                                self.spec)
        if cid is None or self.client_start is None:
            return received
        own = self.client_start(cid, round_idx)
        return {**{n: t for n, t in own.items() if n not in received}, **received}

    def received_state(self, cid: int | None = None) -> Tensors:
        """The shared state as client ``cid`` (or a full-rank client) would receive it
        now (the masked or quantised model where the download is lossy, truncated to
        its rank): what evaluation and export use."""
        if self.down.plain and self.rank(cid) is None and self.downlink is None:
            return self.state
        return pad(self.received(cid), self.spec)

    def on_global(self, tensors: Tensors) -> Tensors:
        """With delta downloads a client trained from the published state P, which lags
        the global state G by what the download codec has not sent yet. Its update is
        carried onto G (``G + (x - P)``), so that lag survives aggregation and goes out
        in later downloads; combined from P, every round would drop it for good."""
        if self.downlink is None:
            return tensors
        held = self.downlink.published
        return {n: self.state[n] + (t - held[n]) if n in self.state and n in held else t
                for n, t in tensors.items()}

    def state_dict(self) -> dict[str, Any] | None:
        return self.downlink.state_dict() if self.downlink else None

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if self.downlink is not None:
            self.downlink.load_state_dict(saved)
