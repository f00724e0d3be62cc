"""Where every adapter starts: the shared init, each client's own A draw, FLoRA-style
fresh draws, and the server's first state. Pure functions of the config seed and the
adapter's layout, so a client and a server that holds no model (a Flower ServerApp)
draw the same values."""

from __future__ import annotations

import torch

from sfedlora.core import seeds
from sfedlora.core.adapters import AdapterLayout
from sfedlora.core.ranks import pad, truncate
from sfedlora.core.records import ClientState, Tensors
from sfedlora.methods import Method, Part
from sfedlora.settings import ExperimentConfig


class AdapterInits:
    def __init__(self, cfg: ExperimentConfig, method: Method, layout: AdapterLayout):
        self.cfg, self.method, self.layout = cfg, method, layout
        self.shared_init = self._draw(seeds.derive_seed(cfg.seed, seeds.A_INIT))
        self._a_names = layout.names({Part.A})
        self._origin: Tensors | None = None

    def _draw(self, a_seed: int) -> Tensors:
        return self.method.initial_adapter(self.layout.initial_state(a_seed))

    def client_init(self, cid: int) -> Tensors:
        if self.cfg.a_init == "independent":
            return self._draw(seeds.derive_seed(self.cfg.seed, seeds.A_INIT, 1, cid))
        return self.shared_init

    def assemble(self, cid: int, state: ClientState, shared: Tensors,
                 round_idx: int | None = None) -> Tensors:
        """Client ``cid``'s full adapter: its init, then its private parts, then the
        server's shared parts on top. Once the server holds A, the client's own A draw
        would be overwritten, so it is not drawn. Where the method re-initialises parts
        every round (``Roles.fresh``), the init of a training round is a fresh draw at
        the client's rank."""
        if self.method.roles.fresh and round_idx is not None:
            fresh = self._draw(seeds.derive_seed(self.cfg.seed, seeds.A_INIT, 2, round_idx,
                                                 cid))
            rank = self.cfg.client_rank(cid)
            if rank != self.cfg.lora.rank:
                fresh = truncate(fresh, rank)
            base = pad(fresh, self.layout.spec)
        else:
            has_a = all(n in shared for n in self._a_names)
            base = self.shared_init if has_a else self.client_init(cid)
        return {**base, **state.private, **shared}

    def drawn_start(self, cid: int, round_idx: int) -> Tensors:
        """The adapter client ``cid`` starts round ``round_idx`` from before anything
        downloaded is applied: its own A draw (independent or fresh), B zero, the head
        as loaded. Every draw is seeded from the public config, so the server can
        measure a change to a tensor it never sent against it."""
        return self.assemble(cid, ClientState(), {}, round_idx)

    def global_adapter(self, shared: Tensors) -> Tensors:
        return {**self.shared_init, **shared}

    def downlink_origin(self) -> Tensors:
        """Version 0 of delta downloads (:mod:`sfedlora.comm.downlink`): the server's first
        state plus, where every client draws its own A, the mean of the clients' draws.
        That mean is not the server's (it holds no A yet) but a reference every party
        computes from the public config; the first aggregated A is that mean plus the
        clients' mean change, so the download codec sends a change instead of A itself
        (a top-k of A's values would leave it mostly zero, a lossless copy costs as
        much as an uncompressed round). Computed once per process: a draw per client."""
        if self._origin is None:
            origin = self.initial_server_state()
            shared = self.method.roles.shared - self.method.roles.fixed - self.method.roles.fresh
            if self.cfg.a_init == "independent" and Part.A in shared:
                total = {n: torch.zeros_like(self.shared_init[n]) for n in self._a_names}
                for cid in range(self.cfg.clients.num):
                    draw = self.client_init(cid)
                    for n in total:
                        total[n] += draw[n]
                origin |= {n: t / self.cfg.clients.num for n, t in total.items()}
            self._origin = origin
        return dict(self._origin)

    def initial_server_state(self) -> Tensors:
        """What the server holds before round 1: the shared parts of the common init
        (without A when every client draws its own A)."""
        parts = set(self.method.roles.shared - self.method.roles.fixed - self.method.roles.fresh)
        if self.cfg.a_init == "independent":
            parts.discard(Part.A)
        return {n: self.shared_init[n].clone() for n in self.layout.names(parts)}
