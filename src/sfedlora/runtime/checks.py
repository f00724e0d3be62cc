"""The server's first stage: decode and check each upload.

An upload is refused, with the reason that gets logged, if it is larger than an honest
client can send (checked before anything is parsed), is not safetensors, holds other
tensor names, shapes or dtypes than the round's plan, non-finite values, or a change
beyond ``server.max_update_norm``; a good one becomes an
:class:`~sfedlora.methods.base.Update` on the server's frame (zero-padded to its rank,
carried onto the global state under delta downloads)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sfedlora.aggregation.combiners import update_norm
from sfedlora.core import codecs, wire
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.ranks import pad, truncated_spec
from sfedlora.methods import Update
from sfedlora.runtime.downloads import Downloads
from sfedlora.settings import ServerConfig

HEADER_ALLOWANCE = 64 * 1024  # bytes of safetensors header/metadata an honest upload may carry


class UpdateRejected(ValueError):
    """An upload that fails a check; the message is the reason that gets logged."""


@dataclass(frozen=True)
class Reply:
    client_id: int
    num_examples: int
    payload: bytes


class UpdateChecks:
    def __init__(self, spec: dict[str, TensorSpec], cfg: ServerConfig, downloads: Downloads):
        self.spec, self.cfg, self.downloads = spec, cfg, downloads

    def byte_limit(self, expected: set[str]) -> int:
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
        limit = self.byte_limit(expected)
        if len(reply.payload) > limit:
            raise UpdateRejected(f"payload of {len(reply.payload)} bytes exceeds {limit}")
        # A client of lower rank sends (and received) truncated tensors: check those
        # shapes, then zero-pad to the server's.
        rank = self.downloads.rank(reply.client_id)
        spec = self.spec if rank is None else truncated_spec(self.spec, rank)
        received = self.downloads.received(reply.client_id)
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
            norm = update_norm(tensors, self.downloads.reference(reply.client_id, round_idx))
            if norm > self.cfg.max_update_norm:
                raise UpdateRejected(
                    f"update norm {norm:.4g} exceeds server.max_update_norm="
                    f"{self.cfg.max_update_norm}"
                )
        # server.weighting=uniform: every client counts as one example
        weight = 1 if self.cfg.weighting == "uniform" else reply.num_examples
        return Update(reply.client_id, weight, self.downloads.on_global(tensors), present)
